"""The error bound of one layer (docs/design.md §2.4) and its composition (§2.5).

For one KV head h of layer l, a rule plan splits the cache into segments sigma (sink, recent,
rest), each stored in its own format for K and for V. With, per segment,
  dK_sigma >= ||dK_t|| and dV_sigma >= ||dV_t|| for every t in sigma   (the formats' error models),
  m_sigma = tau Q dK_sigma  (Q >= ||q|| for every query),  M = max_sigma m_sigma  (r <= 2M, Lemma L4),
  A_sigma >= max_q sum_{t in sigma} alpha_t,  B_sigma >= max_q sum_{t in sigma} alpha_t ||V_t - o||,
  W_sigma >= max_q max_{t in sigma} ||V_t - o||,
every query's attention output moves by at most (docs/design.md §2.4, Lemmas L1-L4)

  E_h = min(max dV, sum_sigma min(1, e^(m_sigma + M) A_sigma) dV_sigma)
        + min(sum_sigma (e^(m_sigma + M) - 1) B_sigma,  2 tanh(M/2) max_sigma W_sigma)

— finite for every plan: the total-variation branch stays below twice the values' spread. The layer injects
b_l = sum_h ||W_o[:, group h]|| sqrt(G) E_h into every token's hidden state, and through blocks with
Lipschitz constants L_j the final hidden states (all T tokens, Frobenius norm) move by at most

  e_L = sqrt(T) sum_l (prod_{j > l} L_j) L'_l b_l   (L'_l: the rest of block l, its MLP).

``exact_*`` functions compute upper bounds in rationals (exp and sqrt rounded up); ``float_*``
twins are for the planner's search only and decide nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .formats import SegmentStats
from .numbers import exp_up, round_up, sqrt_up
from .semantics import READER, STATES

#: an upper bound that is not computed: +infinity. Every comparison with a plan number (<= 1e300) then
#: fails, as it must; witnesses write it as null. E_h itself is always finite now (§2.4).
UNBOUNDED = math.inf

#: exponents above this are not evaluated (docs/design.md §2.4): a first-order term e^x - 1 with x > FO_MAX_ARG
#: is +infinity (its branch of the min is not taken), a mass factor min(1, e^x A) is 1, tanh(x/2) is 1.
FO_MAX_ARG = 128


def tanh_half_up(x: Fraction) -> Fraction:
    """An upper bound of tanh(x/2) for x >= 0: min(x/2, 1 - 2/(e^x + 1)), and 1 for x > FO_MAX_ARG."""
    if x > FO_MAX_ARG:
        return Fraction(1)
    return min(round_up(x / 2), round_up(1 - 2 / (exp_up(x) + 1)))


@dataclass(frozen=True)
class HeadInputs:
    """Inputs of one (layer, KV head): ``keys``/``values`` map segment -> SegmentStats, ``mass_alpha`` /
    ``mass_avo``, ``spread`` (max ||V_t - o||) map segment -> Fraction (upper ends). Only segments present in the rule appear."""

    tau: Fraction
    q_max: Fraction
    keys: dict
    values: dict
    mass_alpha: dict
    mass_avo: dict
    spread: dict


def chain_stages(chain: tuple, stats: SegmentStats) -> list:
    """[(format, the stats it quantizes over, the error after it)] for a value stored through ``chain``
    (docs/design.md §2.3): stage k sees the ranges widened by the error e_(k-1) of the stages before it;
    e_1 = err(f_1), e_k = round_up(e_(k-1) + err(f_k, widened))."""
    out, err = [], Fraction(0)
    for k, f in enumerate(chain):
        st = stats.widened(err)
        e = f.l2_error(st)
        err = e if k == 0 else round_up(err + e)
        out.append((f, st, err))
    return out


def chain_error(chain: tuple, stats: SegmentStats) -> Fraction:
    stages = chain_stages(chain, stats)
    return stages[-1][2] if stages else Fraction(0)


def segment_errors(stats: dict, fmts: dict) -> dict:
    """Per-segment l2 error bounds of a stream with a non-empty recent window iff "recent" is in
    ``stats``: the sink and recent chains, and for rest the larger of RECENT_FAR (recent format) and
    REST (recent then rest format; rest format alone when there is no recent window) — docs/design.md §4."""
    err = {s: chain_error((fmts[s],), stats[s]) for s in stats if s != "rest"}
    if "rest" in stats:
        chain = ((fmts["recent"],) if "recent" in stats else ()) + (fmts["rest"],)
        err["rest"] = chain_error(chain, stats["rest"])
    return err


def head_error(tau: Fraction, q_max: Fraction, dk: dict, dv: dict, mass_alpha: dict, mass_avo: dict,
               spread: dict) -> Fraction:
    """E_h of docs/design.md §2.4 from per-segment error bounds, attention masses (A: mass_alpha, B: mass_avo)
    and value spreads (W: spread, the larger end of max ||V_t - o||)."""
    segs = list(dk)
    if not segs:
        return Fraction(0)
    m = {s: round_up(tau * q_max * dk[s]) for s in segs}
    big = max(m.values())
    first = Fraction(0)
    for s in segs:
        x = m[s] + big
        share = Fraction(1) if x > FO_MAX_ARG else min(Fraction(1), round_up(exp_up(x) * mass_alpha[s]))
        first += round_up(share * dv[s])
    first = min(first, max(dv[s] for s in segs))
    if any(m[s] + big > FO_MAX_ARG for s in segs):
        order1 = UNBOUNDED
    else:
        order1 = round_up(sum((round_up((exp_up(m[s] + big) - 1) * mass_avo[s]) for s in segs), Fraction(0)))
    tv = round_up(2 * tanh_half_up(big) * max(spread[s] for s in segs))
    return round_up(first + min(order1, tv))


def exact_head_error(inp: HeadInputs, fk: dict, fv: dict) -> Fraction:
    return head_error(inp.tau, inp.q_max, segment_errors(inp.keys, fk), segment_errors(inp.values, fv), inp.mass_alpha,
                      inp.mass_avo, inp.spread)


def exact_layer_bound(head_errors: list, o_norms: list, group: int) -> Fraction:
    if UNBOUNDED in head_errors:
        return UNBOUNDED
    sg = sqrt_up(Fraction(group))
    return round_up(sum((round_up(o * sg * e) for o, e in zip(o_norms, head_errors)), Fraction(0)))


def amplification(lipschitz: list) -> list:
    """A_l = prod_{j > l} L_j for every layer (rationals, rounded up)."""
    n = len(lipschitz)
    out = [Fraction(1)] * n
    acc = Fraction(1)
    for li in range(n - 1, -1, -1):
        out[li] = acc
        acc = round_up(acc * lipschitz[li])
    return out


def injected(layer_bounds: list, mlp_gains: list | None) -> list:
    """b'_l = round_up(L'_l b_l): the layer's injected error after the rest of its own block."""
    if mlp_gains is None:
        return list(layer_bounds)
    return [UNBOUNDED if b == UNBOUNDED else round_up(g * b) for g, b in zip(mlp_gains, layer_bounds)]


def exact_end_to_end(layer_bounds: list, lipschitz: list, seq_len: int, mlp_gains: list | None = None) -> Fraction:
    """e_L of docs/design.md §2.5: round_up(sqrt(T) sum_l round_up(A_l b'_l))."""
    amp = amplification(lipschitz)
    inj = injected(layer_bounds, mlp_gains)
    if UNBOUNDED in inj:
        return UNBOUNDED
    s = sum((round_up(a * b) for a, b in zip(amp, inj)), Fraction(0))
    return round_up(sqrt_up(Fraction(seq_len)) * s)


# ---------------------------------------------------------------------------- a whole plan
@dataclass(frozen=True)
class PlanBounds:
    """Every bound of a plan (docs/design.md §2.4-§2.6), exact: per (layer, head) E_h with its
    per-segment dK / dV, per layer b_l, the end-to-end bound (suffix form: Phi on the lm_head input;
    product form: e_L on the last block's output), and the per-token logit-oscillation and KL bounds
    (+inf with the product form)."""

    head_errors: dict
    dk: dict
    dv: dict
    layer_bounds: list
    end_to_end: Fraction
    logit: Fraction = UNBOUNDED
    kl: Fraction = UNBOUNDED


def stream_errors(stream) -> dict:
    """Per segment the largest error of any stored form read as that segment (docs/design.md §2.4, §4):
    the chains of the states whose reader it is, and every block overlapping it (its own inputs)."""
    rule = stream.rule
    out = {}
    for seg in stream.stats:
        errs = [chain_error(rule.chain(st), stream.stats[seg]) for st in STATES if READER[st] == seg]
        s_len = rule.sink
        errs += [b.fmt.l2_error(b.stats) for b in stream.blocks
                 if (b.start < s_len if seg == "sink" else b.end > s_len)]
        out[seg] = max(errs)
    return out


def plan_bounds(pv) -> PlanBounds:
    """The bounds of a :class:`hnfverify.core.planview.PlanView`, used by check, the planner's claims and eval."""
    head_e, dks, dvs, layer_b, lips, mlps = {}, {}, {}, [], [], []
    for layer in pv.layers:
        errs, norms = [], []
        for h in layer.heads:
            dk, dv = stream_errors(h.keys), stream_errors(h.values)
            e = head_error(layer.tau, h.q_max, dk, {s: dv.get(s, Fraction(0)) for s in dk}, h.mass_alpha, h.mass_avo,
                           h.spread)
            head_e[(layer.index, h.head)] = e
            dks[(layer.index, h.head)], dvs[(layer.index, h.head)] = dk, dv
            errs.append(e)
            norms.append(h.o_proj_norm)
        layer_b.append(exact_layer_bound(errs, norms, pv.query_group))
        lips.append(layer.lipschitz)
        mlps.append(layer.mlp_lipschitz)
    comp = pv.composition
    if comp.form == "product":
        return PlanBounds(head_e, dks, dvs, layer_b, exact_end_to_end(layer_b, lips, pv.max_seq_len, mlps))
    phi = suffix_end_to_end(layer_b, [la.suffix for la in pv.layers], pv.max_seq_len, comp.remainder, comp.radius)
    z = logit_osc_bound(phi, comp.logit_gain)
    return PlanBounds(head_e, dks, dvs, layer_b, phi, z, kl_bound(z))


# ---------------------------------------------------------------------------- the suffix composition (§2.5)
def suffix_end_to_end(layer_bounds: list, suffix: list, seq_len: int, remainder: Fraction, radius: Fraction) -> Fraction:
    """Phi of docs/design.md §2.5 (suffix form): with eps_l = round_up(sqrt_up(T) b_l) >= ||e_l||_F,
    Phi = round_up(sum_l round_up(S_l eps_l) + round_up(K sum_l eps_l^2 / 2)) bounds the Frobenius norm of
    the change of the final normed hidden states (the lm_head input) over T tokens, provided
    sum_l eps_l^2 <= rho^2 (the ball where the remainder constant K was measured); +inf otherwise."""
    if UNBOUNDED in layer_bounds:
        return UNBOUNDED
    sq = sqrt_up(Fraction(seq_len))
    eps = [round_up(sq * b) for b in layer_bounds]
    ss = sum((e * e for e in eps), Fraction(0))
    if ss > radius * radius:
        return UNBOUNDED
    first = sum((round_up(s * e) for s, e in zip(suffix, eps)), Fraction(0))
    return round_up(first + round_up(remainder * ss / 2))


def injected_frobenius(layer_bounds: list, seq_len: int) -> list:
    """eps_l = round_up(sqrt_up(T) b_l) of §2.5 (+inf stays +inf)."""
    sq = sqrt_up(Fraction(seq_len))
    return [UNBOUNDED if b == UNBOUNDED else round_up(sq * b) for b in layer_bounds]


# ---------------------------------------------------------------------------- claims about the output (§2.6)
def logit_osc_bound(phi: Fraction, gain: Fraction) -> Fraction:
    """Z = round_up(Gamma Phi) >= osc(dz_t) = max_i dz_t,i - min_i dz_t,i for every token t, where
    Gamma >= 2 max_i ||w_i|| (the lm_head rows) and Phi >= ||dH_t|| (docs/design.md §2.6)."""
    return UNBOUNDED if phi == UNBOUNDED else round_up(gain * phi)


def kl_bound(z: Fraction) -> Fraction:
    """round_up(Z^2 / 8) >= KL(p || p~) and KL(p~ || p) for logits whose change has osc <= Z (Hoeffding's lemma)."""
    return UNBOUNDED if z == UNBOUNDED else round_up(z * z / 8)


def greedy_kept(margin: Fraction, z: Fraction) -> bool:
    """The greedy-token lemma (§2.6): if one run's logits have a unique argmax with margin (top minus
    second) > Z >= osc(dz), the other run's argmax is the same token. Symmetric in the two runs."""
    return z != UNBOUNDED and margin > z
