"""The first-order error bound of one layer (DESIGN 2.4) and its composition (DESIGN 2.3).

For one KV head h of layer l, a rule plan splits the cache into segments sigma (sink, recent,
rest), each stored in its own format for K and for V. With, per segment,
  dK_sigma >= ||dK_t|| and dV_sigma >= ||dV_t|| for every t in sigma   (the formats' error models),
  m_sigma = tau Q dK_sigma  (Q >= ||q|| for every query),  M = max_sigma m_sigma,
  A_sigma >= max_q sum_{t in sigma} alpha_t,  B_sigma >= max_q sum_{t in sigma} alpha_t ||V_t - o||,
every query's attention output moves by at most

  E_h = sum_sigma e^(m_sigma + M) dV_sigma A_sigma + sum_sigma (e^(m_sigma + M) - 1) B_sigma

(alpha~_t / alpha_t lies in [e^-(m_t + M), e^(m_t + M)]; no Taylor truncation). The layer injects
b_l = sum_h ||W_o[:, group h]|| sqrt(G) E_h into every token's hidden state, and through blocks with
Lipschitz constants L_j the final hidden states (all T tokens, Frobenius norm) move by at most

  e_L = sqrt(T) sum_l (prod_{j > l} L_j) b_l.

``exact_*`` functions compute upper bounds in rationals (exp and sqrt rounded up); ``float_*``
twins are for the planner's search only and decide nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .formats import Format, SegmentStats
from .numbers import exp_up, round_up, sqrt_up

SEGMENTS = ("sink", "recent", "rest")


@dataclass(frozen=True)
class HeadInputs:
    """Inputs of one (layer, KV head): ``k``/``v`` map segment -> SegmentStats, ``mass_alpha`` /
    ``mass_avo`` map segment -> Fraction (upper ends). Only segments present in the rule appear."""

    tau: Fraction
    q_max: Fraction
    k: dict
    v: dict
    mass_alpha: dict
    mass_avo: dict


def segment_errors(stats: dict, fmts: dict) -> dict:
    """Per-segment l2 error bounds. A rest position was first stored in the recent window and
    re-quantized when it left (DESIGN 2.5): its error is at most the recent error plus the rest
    format's error on values already moved by that much."""
    err = {s: fmts[s].l2_error(stats[s]) for s in stats if s != "rest"}
    if "rest" in stats:
        prior = err.get("recent", Fraction(0))
        err["rest"] = round_up(fmts["rest"].l2_error(stats["rest"].widened(prior)) + prior)
    return err


def exact_head_error(inp: HeadInputs, fk: dict, fv: dict) -> Fraction:
    segs = list(inp.k)
    dk = segment_errors(inp.k, fk)
    dv = segment_errors(inp.v, fv)
    m = {s: round_up(inp.tau * inp.q_max * dk[s]) for s in segs}
    big_m = max(m.values()) if m else Fraction(0)
    total = Fraction(0)
    for s in segs:
        e = exp_up(m[s] + big_m)
        total += round_up(e * dv[s] * inp.mass_alpha[s]) + round_up((e - 1) * inp.mass_avo[s])
    return round_up(total)


def exact_layer_bound(head_errors: list, o_norms: list, group: int) -> Fraction:
    sg = sqrt_up(Fraction(group))
    return round_up(sum((round_up(o * sg * e) for o, e in zip(o_norms, head_errors)), Fraction(0)))


def amplification(lipschitz: list) -> list:
    """P_l = prod_{j > l} L_j for every layer (rationals, rounded up)."""
    n = len(lipschitz)
    out = [Fraction(1)] * n
    acc = Fraction(1)
    for li in range(n - 1, -1, -1):
        out[li] = acc
        acc = round_up(acc * lipschitz[li])
    return out


def exact_end_to_end(layer_bounds: list, lipschitz: list, seq_len: int) -> Fraction:
    amp = amplification(lipschitz)
    s = sum((round_up(a * b) for a, b in zip(amp, layer_bounds)), Fraction(0))
    return round_up(sqrt_up(Fraction(seq_len)) * s)


# ---------------------------------------------------------------------------- float twins (search only)
@dataclass(frozen=True)
class FloatHead:
    tau: float
    q_max: float
    segs: tuple
    mass_alpha: tuple
    mass_avo: tuple


def float_head_error(fh: FloatHead, dk: tuple, dv: tuple) -> float:
    """dk, dv: per-segment error bounds (floats) in fh.segs order."""
    m = [fh.tau * fh.q_max * x for x in dk]
    big = max(m) if m else 0.0
    total = 0.0
    for i in range(len(fh.segs)):
        e = math.exp(min(m[i] + big, 700.0))
        total += e * dv[i] * fh.mass_alpha[i] + (e - 1.0) * fh.mass_avo[i]
    return total


def float_head_linear(fh: FloatHead, dk: tuple, dv: tuple) -> float:
    """The bound's first-order Taylor term in the errors (exp(x) -> 1 + x, dV * dK dropped):
    sum dV A + (m + M) B. Not a bound; the planner's ``--objective linear`` ranks moves by it."""
    m = [fh.tau * fh.q_max * x for x in dk]
    big = max(m) if m else 0.0
    return sum(dv[i] * fh.mass_alpha[i] + (m[i] + big) * fh.mass_avo[i] for i in range(len(fh.segs)))
