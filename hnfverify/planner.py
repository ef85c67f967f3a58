"""The planner: an analysis report -> a rule plan (one format per layer x KV head x K|V x segment).

Segments (docs/design.md §4): positions t < S are attention sinks; for the current query i, positions
t >= S with i - t < R are the recent window; the rest are "rest". A position that leaves the
window is re-quantized to the rest format. S and R must be on the analysis' rule grid.

Per unit (layer, head, K|V, segment) the usable formats form a *chain*: representable formats
sorted by bits, keeping a format only if it has strictly smaller error (its l2 error model) and,
for keys, no larger Theorem 5.7 term u D^2 than every cheaper kept format. Moving up a chain never
increases any bound.

* Theorem 5.7 (exact rationals): a key format is admissible where eps >= c kappa_hi D_hi^2 u;
  values have kappa = 0, so every value format is. ``thm_min`` is the first admissible chain index.
* The end-to-end bound (``hnfverify.bound``) is lowered by one deterministic greedy sequence:
  from a start state, repeatedly take the move (a unit to any higher chain entry) with the
  largest bound reduction per added cache bit. The sequence does not depend on the budget.
* ``--eps``: eps is both Theorem 5.7's tolerance and the budget of every (layer, KV head)'s
  first-order attention-output error E_h (``hnfverify.bound``) — which is what limits values,
  whose curvature is 0. Per head, the shortest prefix of that head's own greedy sequence with
  E_h <= eps. ``--eps-target`` adds the end-to-end budget: the shortest prefix of the global
  sequence (from the chain bottoms) with bound <= eps_target. Every unit takes the highest of
  the three formats, so tightening eps can only raise formats.
* ``--avg-bits B``: the longest prefix of the sequence from ``thm_min`` (or the chain bottoms if
  no eps) whose average bits (overhead included) are <= B. Raising B only extends the prefix,
  so the bound never rises.
* ``--avg-bits`` orders its moves by ``--objective``: ``linear`` (default) lowers the sum over layers
  of the bounds' first-order Taylor terms (sum dV A + (m + M) B weighted by ||W_o|| sqrt(G)) — not a
  bound, a ranking; ``layers`` lowers the sum of the layers' first-order bounds b_l themselves, whose
  exponential key terms are astronomically large at 2-4 bits and starve the values; ``end_to_end``
  lowers e_L, whose weights (products of downstream Lipschitz estimates, ~1e29 for the first layers of
  SmolLM2) pour the bits into early layers. Measured on real text in that order (BENCHMARKS.md,
  ablation). ``--eps-target`` always uses e_L. Whatever the ranking, the plan's bounds are computed
  exactly and certified by ``hnfverify check``.
* ``--uniform SPEC``: fixed formats (the baselines), through the same code path; SPEC is one
  format or per K/V/segment overrides (``parse_uniform``). ``assign``: explicit per-unit formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from fractions import Fraction

from .bound import (SEGMENTS, FloatHead, HeadInputs, exact_end_to_end, exact_head_error, exact_layer_bound,
                    float_head_error, float_head_linear)
from .errors import HnfError, InvalidArgument
from .formats import Format, SegmentStats, by_name, format_table
from .numbers import dec_down, dec_up, fmt_number, parse_number, round_up, sqrt_up

BUDGET_SPLIT = {
    "end_to_end": "greedy: largest reduction of the end-to-end bound per added cache bit, over all "
                  "(layer, KV head, K|V, segment) units",
    "layers": "greedy: largest reduction of the sum of the per-layer first-order attention-output bounds "
              "(no downstream amplification) per added cache bit, over all (layer, KV head, K|V, segment) units",
    "linear": "greedy: largest reduction of the sum over layers of the bounds' first-order Taylor terms "
              "(sum dV A + (m + M) B, no exponential) per added cache bit, over all (layer, KV head, K|V, segment) "
              "units",
}
OBJECTIVES = tuple(BUDGET_SPLIT)
EPS_SPLIT = ("Theorem 5.7 per key segment; per (layer, KV head) the shortest prefix of its greedy sequence "
             "(largest reduction of its bound E_h per added bit) with E_h <= eps; each unit takes the highest.")
ASSIGNED = "explicit per-unit formats given by the caller"
_UNIFORM_KEYS = {"K", "V", "sink", "recent", "rest"} | {f"{kv}.{s}" for kv in "KV" for s in SEGMENTS}


def parse_uniform(spec: str) -> dict:
    """``--uniform`` spec -> {selector: format name}. A bare format is the default; ``K=``, ``V=``,
    ``rest=``, ``K.rest=`` ... override it (most specific wins: K.rest > K > rest > default). Example,
    KIVI-style: ``fp16,K.rest=int4_c32,V.rest=int4_t64`` with ``--sink 0 --recent 128``."""
    out: dict = {}
    for item in (x.strip() for x in str(spec).split(",")):
        if not item:
            raise InvalidArgument(f"--uniform {spec!r}: empty item")
        key, _, name = item.rpartition("=")
        key = key.strip() or "*"
        if key != "*" and key not in _UNIFORM_KEYS:
            raise InvalidArgument(f"--uniform {spec!r}: unknown selector {key!r} (use K, V, sink, recent, rest or "
                                  "K.rest style)")
        if key in out:
            raise InvalidArgument(f"--uniform {spec!r}: {key!r} given twice")
        out[key] = name.strip()
    if "*" not in out and not all(f"{kv}.{s}" in out or kv in out or s in out for kv in "KV" for s in SEGMENTS):
        raise InvalidArgument(f"--uniform {spec!r}: give a default format (a bare name) or cover every K/V segment")
    return out


def uniform_format(sel: dict, kv: str, seg: str) -> str:
    for key in (f"{kv}.{seg}", kv, seg, "*"):
        if key in sel:
            return sel[key]
    raise AssertionError("parse_uniform guarantees a default")


class PlanInfeasible(HnfError):
    """No plan satisfies the request (exit code 2): the message says what the best achievable is."""


@dataclass(frozen=True)
class PlanRequest:
    eps: Fraction | None = None
    eps_target: Fraction | None = None
    avg_bits: Fraction | None = None
    uniform: str | None = None
    c: Fraction = Fraction(4)
    sink: int = 4
    recent: int = 64
    lipschitz_margin: Fraction = Fraction(11, 10)
    curvature: str | None = None          # None: the report's choice
    max_seq_len: int | None = None
    objective: str = "linear"             # what --avg-bits' greedy sequence lowers
    assign: tuple | None = None           # ((layer, head, "K"|"V", segment, format), ...): explicit plans

    def validate(self) -> None:
        modes = [x is not None for x in (self.eps, self.avg_bits, self.uniform, self.assign)]
        if not any(modes):
            raise InvalidArgument("give --eps, --avg-bits or --uniform")
        fixed = self.uniform is not None or self.assign is not None
        if fixed and (self.avg_bits is not None or self.eps_target is not None):
            raise InvalidArgument("--uniform cannot be combined with --avg-bits or --eps-target")
        if self.uniform is not None and self.assign is not None:
            raise InvalidArgument("uniform and assign are exclusive")
        if self.objective not in OBJECTIVES:
            raise InvalidArgument(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.eps is not None and self.eps <= 0:
            raise InvalidArgument(f"--eps must be > 0, got {fmt_number(self.eps)}")
        if self.eps_target is not None and self.eps_target <= 0:
            raise InvalidArgument(f"--eps-target must be > 0, got {fmt_number(self.eps_target)}")
        if self.avg_bits is not None and self.avg_bits <= 0:
            raise InvalidArgument(f"--avg-bits must be > 0, got {fmt_number(self.avg_bits)}")
        if self.c <= 0:
            raise InvalidArgument(f"--c must be > 0, got {fmt_number(self.c)}")
        if self.lipschitz_margin < 1:
            raise InvalidArgument(f"--lipschitz-margin must be >= 1, got {fmt_number(self.lipschitz_margin)}")
        if self.curvature not in (None, "exact", "seed"):
            raise InvalidArgument(f"--curvature must be exact or seed, got {self.curvature!r}")


@dataclass
class Unit:
    layer: int
    head: int
    kv: str                      # "K" | "V"
    seg: str
    length: int
    stats: SegmentStats
    kappa: tuple                 # (lo, hi) Fractions; (0, 0) for values
    inputs: dict                 # JSON-ready intervals
    chain: list = field(default_factory=list)        # list[Format]
    errors: list = field(default_factory=list)       # exact l2 error per chain entry (values not re-quantized)
    slopes: list = field(default_factory=list)       # d error / d prior error (rest only; float)
    thm_min: int | None = 0
    idx: int = 0
    sink: int = 0                # the stream's rule and max_seq_len, for its exact byte accounting
    recent: int = 0
    t: int = 0


def unit_bits(u: Unit, f: Format, d: int = 1) -> Fraction:
    """Bits the unit's segment occupies at max_seq_len in format f (docs/design.md §4, accounting)."""
    return _segment_bits(f, u.seg, u.sink, u.recent, u.t, d)


@lru_cache(maxsize=None)
def _segment_bits(f: Format, seg: str, sink: int, recent: int, t: int, d: int) -> Fraction:
    from .semantics import StreamRule, segment_bits, stored_counts

    rule = StreamRule(sink, recent, {"sink": f, "recent": f, "rest": f})
    return segment_bits(f, seg, stored_counts(rule, t), d)


def _iv(lo: float, hi: float) -> list:
    return [dec_down(max(lo, 0.0)), dec_up(max(hi, 0.0))]


def _lengths(s: int, r: int, t: int) -> dict:
    sink = min(s, t)
    recent = min(r, max(0, t - s))
    rest = max(0, t - s - r)
    return {"sink": sink, "recent": recent, "rest": rest}


def theorem_term(fmt: Format, unit: Unit, c: Fraction) -> Fraction:
    """c kappa_hi D^2 u: Theorem 5.7 holds for this unit and format iff eps >= this."""
    d = fmt.theorem_diameter(unit.stats)
    return c * unit.kappa[1] * d * d * fmt.u


def _build_chain(unit: Unit, table: dict, c: Fraction) -> None:
    # channel-grouped formats only for the rest segment: the sink is a handful of tokens and the
    # recent window slides one token at a time, so neither holds complete channel groups
    cands = [f for f in table.values() if f.representable(unit.stats)
             and (f.granularity != "channel" or unit.seg == "rest")]
    errs = {f.name: f.l2_error(unit.stats) for f in cands}
    # cost = the bits the segment really occupies (a short segment cannot fill channel groups)
    cands.sort(key=lambda f: (unit_bits(unit, f), errs[f.name], f.name))
    chain, best_err, best_thm = [], None, None
    for f in cands:
        e = errs[f.name]
        th = theorem_term(f, unit, c) if unit.kv == "K" else Fraction(0)
        if best_err is None or (e < best_err and th <= best_thm):
            chain.append(f)
            best_err, best_thm = e, th
    unit.chain = chain
    _set_errors(unit)


def _set_errors(unit: Unit) -> None:
    unit.errors = [f.l2_error(unit.stats) for f in unit.chain]
    # the error is affine in the prior (recent) error for every format but FP8's scale floor: a secant
    # slope over [0, 1] is enough for the search; decisions are checked with the exact bound
    unit.slopes = [float(f.l2_error(unit.stats.widened(Fraction(1))) - e) + 1.0 if unit.seg == "rest" else 0.0
                   for f, e in zip(unit.chain, unit.errors)]


def _units_from_report(summary: dict, arrays: dict, req: PlanRequest, table: dict) -> tuple[list, dict]:
    import numpy as np

    shape = summary["shape"]
    n_l, n_h, w, d = shape["layers"], shape["kv_heads"], shape["positions"], shape["head_dim"]
    grid = summary["rule_grid"]
    if req.sink not in grid["sinks"]:
        raise InvalidArgument(f"--sink must be one of the analyzed sink lengths {grid['sinks']}, got {req.sink}")
    if req.recent not in grid["windows"]:
        raise InvalidArgument(f"--recent must be one of the analyzed window lengths {grid['windows']}, "
                              f"got {req.recent}")
    t = req.max_seq_len or w
    if not 1 <= t <= w:
        raise InvalidArgument(f"--max-seq-len must be in [1, {w}] (the analyzed window), got {t}")
    si, ri = grid["sinks"].index(req.sink), grid["windows"].index(req.recent)
    lengths = _lengths(req.sink, req.recent, t)
    curvature = req.curvature or summary["analysis"]["curvature"]
    s = min(req.sink, t)
    pos = {"sink": slice(0, s), "recent": slice(s, t), "rest": slice(s, t)}
    seg_idx = {"sink": 0, "recent": 1, "rest": 2}
    units = []
    for li in range(n_l):
        for h in range(n_h):
            for kv in ("K", "V"):
                p = kv.lower()
                amax_arr = np.maximum(np.abs(arrays[f"{p}_tok_min"][li, h]), np.abs(arrays[f"{p}_tok_max"][li, h]))
                for seg in SEGMENTS:
                    if lengths[seg] == 0:
                        continue
                    sl = pos[seg]

                    def mx(a):
                        return float(np.max(a[sl])) if a[sl].size else 0.0

                    if kv == "V":
                        k_lo = k_hi = 0.0
                    elif curvature == "seed":
                        k_lo = k_hi = mx(arrays["kappa_seed"][li, h])
                    elif seg == "sink":
                        k_lo, k_hi = mx(arrays["kappa_exact_lo"][li, h]), mx(arrays["kappa_exact_hi"][li, h])
                    else:
                        which = "near" if seg == "recent" else "far"
                        k_lo = mx(arrays[f"kappa_{which}_lo"][li, ri, h])
                        k_hi = mx(arrays[f"kappa_{which}_hi"][li, ri, h])
                    d_tok, d_ch, amax = mx(arrays[f"{p}_d_token"][li, h]), mx(arrays[f"{p}_d_channel"][li, h]), \
                        float(np.max(amax_arr[sl]))
                    ma = arrays["mass_alpha_hi"][li, si, ri, seg_idx[seg], h]
                    ma_lo = arrays["mass_alpha_lo"][li, si, ri, seg_idx[seg], h]
                    mv = arrays["mass_avo_hi"][li, si, ri, seg_idx[seg], h]
                    mv_lo = arrays["mass_avo_lo"][li, si, ri, seg_idx[seg], h]
                    inputs = {
                        "kappa": _iv(k_lo, k_hi),
                        "d_token": _iv(d_tok, d_tok), "d_channel": _iv(d_ch, d_ch), "amax": _iv(amax, amax),
                        "alpha": _iv(mx(arrays["alpha_max_lo"][li, h]), mx(arrays["alpha_max_hi"][li, h])),
                        "qnorm": _iv(mx(arrays["qnorm_max_lo"][li, h]), mx(arrays["qnorm_max_hi"][li, h])),
                        "vo": _iv(mx(arrays["vo_max_lo"][li, h]), mx(arrays["vo_max_hi"][li, h])),
                        "mass_alpha": _iv(float(ma_lo), float(ma)), "mass_avo": _iv(float(mv_lo), float(mv)),
                    }
                    stats = SegmentStats(d, parse_number(inputs["d_token"][1]), parse_number(inputs["d_channel"][1]),
                                         parse_number(inputs["amax"][1]))
                    kap = (parse_number(inputs["kappa"][0]), parse_number(inputs["kappa"][1]))
                    units.append(Unit(li, h, kv, seg, lengths[seg], stats, kap, inputs, sink=req.sink,
                                      recent=req.recent, t=t))
    meta = {"max_seq_len": t, "lengths": lengths, "curvature": curvature, "head_dim": d}
    return units, meta


def head_inputs(units_lh: list, tau: Fraction, q_max: Fraction) -> HeadInputs:
    k = {u.seg: u.stats for u in units_lh if u.kv == "K"}
    v = {u.seg: u.stats for u in units_lh if u.kv == "V"}
    ma = {u.seg: parse_number(u.inputs["mass_alpha"][1]) for u in units_lh if u.kv == "K"}
    mv = {u.seg: parse_number(u.inputs["mass_avo"][1]) for u in units_lh if u.kv == "K"}
    return HeadInputs(tau, q_max, k, v, ma, mv)


class _Search:
    """Float twin of the exact bound for the greedy sequence."""

    def __init__(self, units, heads, weights, amp, lengths, linear=False):
        self.units = units
        self.err_fn = float_head_linear if linear else float_head_error
        self.by_lh: dict = {}
        for i, u in enumerate(units):
            self.by_lh.setdefault((u.layer, u.head), []).append(i)
        self.heads = heads                  # (l, h) -> FloatHead
        self.w = weights                    # (l, h) -> o_norm sqrt(G) (float)
        self.amp = amp                      # layer -> P_l (float)
        self.errf = [[float(e) for e in u.errors] for u in units]
        self.slope = [u.slopes for u in units]
        self.bits = [[float(unit_bits(u, f)) for f in u.chain] for u in units]
        self.length = [1 for u in units]          # bits above are already per segment

    def head_error(self, lh, state) -> float:
        fh = self.heads[lh]
        idx = self.by_lh[lh]
        out = []
        for kv in ("K", "V"):
            e = {}
            for i in idx:
                u = self.units[i]
                if u.kv == kv:
                    e[u.seg] = (self.errf[i][state[i]], self.slope[i][state[i]])
            err = {sg: v[0] for sg, v in e.items() if sg != "rest"}
            if "rest" in e:
                prior = err.get("recent", 0.0)
                err["rest"] = e["rest"][0] + e["rest"][1] * prior
            out.append(tuple(err[sg] for sg in fh.segs))
        return self.err_fn(fh, out[0], out[1])

    def best_move(self, lh, state, cur_err):
        best = None
        scale = self.amp[lh[0]] * self.w[lh]
        for i in self.by_lh[lh]:
            for j in range(state[i] + 1, len(self.units[i].chain)):
                old = state[i]
                state[i] = j
                e = self.head_error(lh, state)
                state[i] = old
                gain = scale * (cur_err - e)
                cost = (self.bits[i][j] - self.bits[i][old]) * self.length[i]
                if gain <= 0 or cost <= 0:
                    continue
                score = gain / cost
                if best is None or score > best[0]:
                    best = (score, i, j, e)
        return best

    def head_sequence(self, lh, start):
        """Greedy moves within one (layer, head) from ``start`` until none lowers its error."""
        state = list(start)
        err = self.head_error(lh, state)
        moves = []
        while True:
            c = self.best_move(lh, state, err)
            if c is None:
                return moves
            _, i, j, err = c
            state[i] = j
            moves.append((i, j))

    def sequence(self, start):
        """Greedy moves from ``start`` until no move lowers the bound: [(unit, new index)]."""
        state = list(start)
        errs = {lh: self.head_error(lh, state) for lh in self.by_lh}
        cand = {lh: self.best_move(lh, state, errs[lh]) for lh in self.by_lh}
        moves = []
        while True:
            live = [(c[0], lh) for lh, c in cand.items() if c is not None]
            if not live:
                break
            _, lh = max(live, key=lambda x: (x[0], -x[1][0], -x[1][1]))
            _, i, j, e = cand[lh]
            state[i] = j
            errs[lh] = e
            moves.append((i, j))
            cand[lh] = self.best_move(lh, state, errs[lh])
        return moves


def _avg_bits(units, state) -> Fraction:
    tot = sum(u.length for u in units)
    return sum((unit_bits(u, u.chain[s]) for u, s in zip(units, state)), Fraction(0)) / tot


def plan_from_report(summary: dict, arrays: dict, req: PlanRequest, report_name: str = "") -> dict:
    """Build the plan (a JSON-ready dict in canonical form). Raises PlanInfeasible / InvalidArgument."""
    req.validate()
    shape = summary["shape"]
    d = shape["head_dim"]
    g_q = shape["query_heads"] // shape["kv_heads"]
    table = format_table(d, summary["analysis"]["channel_group"])
    fixed = None
    if req.uniform is not None:
        sel = parse_uniform(req.uniform)
        for key, name in sel.items():
            f = by_name(name)
            if f.name not in table:
                raise InvalidArgument(f"--uniform {name!r} is not in this model's format table: {sorted(table)}")
            if f.granularity == "channel" and not (key == "rest" or key.endswith(".rest")):
                raise InvalidArgument(f"--uniform {f.name}: channel-grouped formats cannot hold the sink or the recent "
                                      "window (tokens arrive one at a time); use a per-token or float format, or "
                                      f"give it for the rest only ({'K.rest' if key in ('*', 'K') else key}={f.name})")

        def fixed(u):
            return table[by_name(uniform_format(sel, u.kv, u.seg)).name]
    elif req.assign is not None:
        given = {}
        for item in req.assign:
            layer, head, kv, seg, name = item
            if name not in table:
                raise InvalidArgument(f"assign: {name!r} is not in this model's format table: {sorted(table)}")
            given[(int(layer), int(head), kv, seg)] = table[name]

        def fixed(u):
            try:
                f = given[(u.layer, u.head, u.kv, u.seg)]
            except KeyError:
                raise InvalidArgument(f"assign: no format for layer {u.layer} head {u.head} {u.kv} {u.seg}") from None
            if f.granularity == "channel" and u.seg != "rest":
                raise InvalidArgument(f"assign: channel-grouped {f.name} for {u.seg} (rest only)")
            return f
    units, meta = _units_from_report(summary, arrays, req, table)
    for i, u in enumerate(units):
        u.idx = i
    n_l, n_h = shape["layers"], shape["kv_heads"]
    import numpy as np

    tau = [parse_number(dec_up(float(x))) for x in arrays["scaling"]]
    lips_meas = arrays["lipschitz"]
    if not np.all(np.isfinite(lips_meas)):
        raise InvalidArgument("the report has no Lipschitz estimates (analyzed with --lipschitz-iters 0); "
                              "re-run analyze with the estimate on")
    lips = [round_up(parse_number(dec_up(float(x))) * req.lipschitz_margin) for x in lips_meas]
    if "mlp_lipschitz" not in arrays or not np.all(np.isfinite(arrays["mlp_lipschitz"])):
        raise InvalidArgument("the report has no estimates of the rest-of-block (MLP) gains; re-run analyze")
    mlp_meas = arrays["mlp_lipschitz"]
    mlps = [round_up(parse_number(dec_up(float(x))) * req.lipschitz_margin) for x in mlp_meas]
    onorm = [[parse_number(dec_up(float(arrays["o_proj_norm_kvhead"][li, h]))) for h in range(n_h)]
             for li in range(n_l)]
    qmax = [[parse_number(dec_up(float(arrays["qnorm_max_hi"][li, h].max()))) for h in range(n_h)]
            for li in range(n_l)]

    # chains, Theorem 5.7 minima
    infeasible = []
    for u in units:
        if fixed is not None:
            uf = fixed(u)
            if not uf.representable(u.stats):
                raise PlanInfeasible(f"--uniform {uf.name}: layer {u.layer} head {u.head} {u.kv} holds values up to "
                                     f"{float(u.stats.amax):.4g}, beyond the format's range")
            u.chain = [uf]
            _set_errors(u)
            u.thm_min = 0 if (req.eps is None or u.kv == "V" or req.eps >= theorem_term(uf, u, req.c)) else None
            continue
        _build_chain(u, table, req.c)
        if not u.chain:
            raise PlanInfeasible(f"layer {u.layer} head {u.head} {u.kv} {u.seg}: no format can represent values "
                                 f"up to {float(u.stats.amax):.4g}")
        if req.eps is None or u.kv == "V":
            u.thm_min = 0
        else:
            u.thm_min = next((i for i, f in enumerate(u.chain) if req.eps >= theorem_term(f, u, req.c)), None)
            if u.thm_min is None:
                infeasible.append(u)
    if infeasible:
        worst = max(infeasible, key=lambda u: theorem_term(u.chain[-1], u, req.c))
        need = theorem_term(worst.chain[-1], worst, req.c)
        raise PlanInfeasible(
            f"Theorem 5.7 cannot hold at --eps {fmt_number(req.eps)}: at {len(infeasible)} of "
            f"{sum(u.kv == 'K' for u in units)} key segments even {worst.chain[-1].name} is too coarse "
            f"(worst: layer {worst.layer} head {worst.head} K {worst.seg}, needs eps >= {_show(need)})")

    lh_units: dict = {}
    for i, u in enumerate(units):
        lh_units.setdefault((u.layer, u.head), []).append(u)
    exact_heads = {lh: head_inputs(us, tau[lh[0]], qmax[lh[0]][lh[1]]) for lh, us in lh_units.items()}
    sg = math.sqrt(g_q)
    weights = {lh: float(onorm[lh[0]][lh[1]]) * sg for lh in lh_units}
    amp_f = []
    acc = 1.0
    for li in range(n_l - 1, -1, -1):
        amp_f.append(acc)
        acc *= float(lips[li])
    amp_f = [a * float(m) for a, m in zip(amp_f[::-1], mlps)]      # A_l L'_l (docs/design.md §2.5)
    amp_e2e = amp_f
    if req.objective in ("layers", "linear"):
        amp_f = [1.0] * n_l
    float_heads = {}
    for lh, us in lh_units.items():
        segs = tuple(s for s in SEGMENTS if any(u.seg == s and u.kv == "K" for u in us))
        hi = exact_heads[lh]
        float_heads[lh] = FloatHead(float(hi.tau), float(hi.q_max), segs,
                                    tuple(float(hi.mass_alpha[s]) for s in segs),
                                    tuple(float(hi.mass_avo[s]) for s in segs))
    search = _Search(units, float_heads, weights, amp_f, meta["lengths"], linear=req.objective == "linear")
    search_e2e = search if req.objective == "end_to_end" else _Search(units, float_heads, weights, amp_e2e,
                                                                      meta["lengths"])
    sqrt_t = math.sqrt(meta["max_seq_len"])

    def exact_bound(state):
        layer_b = []
        for li in range(n_l):
            errs = []
            for h in range(n_h):
                us = lh_units[(li, h)]
                idx = [u.idx for u in us]
                fk = {u.seg: u.chain[state[i]] for u, i in zip(us, idx) if u.kv == "K"}  # noqa: F841
                fv = {u.seg: u.chain[state[i]] for u, i in zip(us, idx) if u.kv == "V"}
                errs.append(exact_head_error(exact_heads[(li, h)], fk, fv))
            layer_b.append(exact_layer_bound(errs, onorm[li], g_q))
        return layer_b, exact_end_to_end(layer_b, lips, meta["max_seq_len"], mlps)

    def float_bound(state):
        return sqrt_t * sum(amp_e2e[lh[0]] * weights[lh] * search_e2e.head_error(lh, state) for lh in lh_units)

    bottom = [0] * len(units)
    thm = [u.thm_min for u in units]
    if req.uniform is not None:
        state = bottom
        mode = {"kind": "uniform", "value": req.uniform}
    elif req.assign is not None:
        state = bottom
        mode = {"kind": "assigned", "value": f"{len(req.assign)} units"}
    elif req.avg_bits is not None:
        start = thm
        if _avg_bits(units, start) > req.avg_bits:
            raise PlanInfeasible(f"--avg-bits {fmt_number(req.avg_bits)} is below the cheapest plan allowed "
                                 f"({'by Theorem 5.7 at --eps ' + fmt_number(req.eps) if req.eps else 'by the formats'}): "
                                 f"{float(_avg_bits(units, start)):.4f} bits per element")
        state = list(start)
        for i, j in search.sequence(start):
            old = state[i]
            state[i] = j
            if _avg_bits(units, state) > req.avg_bits:
                state[i] = old
                break
        mode = {"kind": "avg_bits", "value": fmt_number(req.avg_bits)}
    else:
        # the first-order attention-output error of every (layer, head) must also be <= eps: this is
        # what limits values (kappa = 0); per head, the shortest prefix of its own greedy sequence
        head_budget = list(bottom)
        for lh, us in lh_units.items():
            moves = search_e2e.head_sequence(lh, bottom)
            st = list(bottom)
            k = 0
            while True:
                fk = {u.seg: u.chain[st[u.idx]] for u in us if u.kv == "K"}
                fv = {u.seg: u.chain[st[u.idx]] for u in us if u.kv == "V"}
                if search_e2e.head_error(lh, st) <= float(req.eps) * (1 - 1e-9) or k >= len(moves):
                    e_exact = exact_head_error(exact_heads[lh], fk, fv)
                    if e_exact <= req.eps:
                        break
                    if k >= len(moves):
                        raise PlanInfeasible(
                            f"--eps {fmt_number(req.eps)}: the attention-output error bound of layer {lh[0]} "
                            f"KV head {lh[1]} is at least {_show(e_exact)} with the finest formats")
                i, j = moves[k]
                st[i] = j
                k += 1
            for u in us:
                head_budget[u.idx] = st[u.idx]
        thm = [max(a, b) for a, b in zip(thm, head_budget)]
        state = list(thm)
        if req.eps_target is not None:
            budget = list(bottom)
            moves = search_e2e.sequence(bottom)
            k = 0
            while True:
                final = [max(a, b) for a, b in zip(thm, budget)]
                if float_bound(budget) <= float(req.eps_target) * (1 - 1e-9) or k >= len(moves):
                    if exact_bound(final)[1] <= req.eps_target:
                        break
                    if k >= len(moves):
                        raise PlanInfeasible(
                            f"--eps-target {fmt_number(req.eps_target)} is below the smallest end-to-end bound "
                            f"these formats reach: {_show(exact_bound(final)[1])}")
                i, j = moves[k]
                budget[i] = j
                k += 1
            state = final
        mode = {"kind": "eps", "value": fmt_number(req.eps)}

    if fixed is None:
        state = _theorem_fixup(units, state, req)
        if req.avg_bits is not None and _avg_bits(units, state) > req.avg_bits:
            raise PlanInfeasible(f"--avg-bits {fmt_number(req.avg_bits)}: Theorem 5.7 at --eps {fmt_number(req.eps)} "
                                 f"for the re-quantized forms needs {float(_avg_bits(units, state)):.4f} bits")
    layer_b, e_l = exact_bound(state)
    head_err = [[exact_head_error(exact_heads[(li, h)],
                                  {u.seg: u.chain[state[u.idx]] for u in lh_units[(li, h)] if u.kv == "K"},
                                  {u.seg: u.chain[state[u.idx]] for u in lh_units[(li, h)] if u.kv == "V"})
                 for h in range(n_h)] for li in range(n_l)]
    if req.avg_bits is not None and req.eps_target is not None and e_l > req.eps_target:
        raise PlanInfeasible(f"at --avg-bits {fmt_number(req.avg_bits)} the end-to-end bound is "
                             f"{_show(e_l)} > --eps-target {fmt_number(req.eps_target)}")
    plan = _assemble(summary, req, units, state, meta, table, tau, lips, lips_meas, mlps, mlp_meas, onorm, qmax,
                     layer_b, e_l, mode, report_name)
    plan["claims"]["attention_error_max"] = [claim_up(max(row)) for row in head_err]
    return plan


def _show(x) -> str:
    """A bound in a message: 4 significant digits, or "more than 1E+300" (beyond floats and plan numbers)."""
    return "more than 1E+300" if x > 10 ** 300 else dec_up(float(x), 4)


def claim_up(x: Fraction) -> str | None:
    """A bound for the plan's claims, rounded up to 6 digits; None (JSON null) above 1e300, beyond the
    range of plan numbers — such a bound is vacuous anyway (INT2 keys make exp(tau q dK) huge)."""
    return None if x > 10 ** 300 else dec_up(float(x), 6)


def stored_form_terms(units, state, c) -> list:
    """[(units whose formats the form passed through, rhs c kappa sum u D^2, domain problems)] for every
    stored form a query can read (docs/design.md §4), by the checker's own definition
    (``semantics.reachable``, ``verify.obligations.precision_terms``): what the plan must satisfy."""
    from .semantics import READER, State, StreamRule, reachable
    from .verify.obligations import precision_terms

    streams: dict = {}
    for u in units:
        streams.setdefault((u.layer, u.head, u.kv), {})[u.seg] = u
    out = []
    for segs in streams.values():
        one = next(iter(segs.values()))
        fmts = {seg: u.chain[state[u.idx]] for seg, u in segs.items()}
        fill = fmts.get("rest") or next(iter(fmts.values()))
        rule = StreamRule(one.sink, one.recent, {seg: fmts.get(seg, fill) for seg in SEGMENTS})
        for st, _, _ in reachable(rule, one.t):
            chain = rule.chain(st)
            if not chain:
                continue
            reader = segs[READER[st]]
            through = [segs[s] for s in ((["recent"] if one.recent > 0 else []) + ["rest"] if st is State.REST
                                         else ["recent"] if st is State.RECENT_FAR else [READER[st]])]
            _, rhs, domain = precision_terms(Fraction(0), c, chain, reader.stats, reader.kappa[1])
            out.append((through, rhs, domain))
    return out


def implied_eps(units, state, c) -> Fraction:
    """The smallest eps for which Theorem 5.7 holds for every stored key form of the plan."""
    return max((rhs for us, rhs, _ in stored_form_terms(units, state, c) if us[0].kv == "K"), default=Fraction(0))


def _theorem_fixup(units, state, req) -> list:
    """Raise formats along their chains until every stored form is in its formats' domains and, with a
    user eps, satisfies Theorem 5.7 in its chain form. Moving up a chain never raises any bound."""
    state = list(state)
    while True:
        bad = [(us, rhs, dom) for us, rhs, dom in stored_form_terms(units, state, req.c)
               if dom or (req.eps is not None and us[0].kv == "K" and rhs > req.eps)]
        if not bad:
            return state
        for us, rhs, dom in bad:
            up = [u for u in us if state[u.idx] + 1 < len(u.chain)]
            if not up:
                u = us[-1]
                raise PlanInfeasible(f"layer {u.layer} head {u.head} {u.kv} {u.seg}: "
                                     + (f"values outside every format's domain ({dom[0]})" if dom else
                                        f"Theorem 5.7 needs eps >= {_show(rhs)} even with the finest "
                                        "formats of the chain"))
            u = up[-1] if dom else max(up, key=lambda u: theorem_term(u.chain[state[u.idx]], u, req.c))
            state[u.idx] += 1


def _assemble(summary, req, units, state, meta, table, tau, lips, lips_meas, mlps, mlp_meas, onorm, qmax, layer_b,
              e_l, mode, report_name) -> dict:
    from . import __version__

    shape = summary["shape"]
    n_l, n_h = shape["layers"], shape["kv_heads"]
    used = sorted({u.chain[s].name for u, s in zip(units, state)})
    if req.eps is not None:
        eps, eps_source = req.eps, "user"
    else:
        eps, eps_source = parse_number(dec_up(float(implied_eps(units, state, req.c)) * (1 + 1e-12) + 1e-300, 6)), \
            "implied"
        while eps < implied_eps(units, state, req.c):
            eps *= 2
    layers = []
    by_lh: dict = {}
    for u, s in zip(units, state):
        by_lh.setdefault((u.layer, u.head), {}).setdefault(u.kv, {})[u.seg] = (u, s)
    for li in range(n_l):
        heads = []
        for h in range(n_h):
            entry = {"kv_head": h, "o_proj_norm": fmt_number(onorm[li][h]), "q_max": fmt_number(qmax[li][h])}
            for kv in ("K", "V"):
                segs = by_lh[(li, h)][kv]
                rule = {"blocks": []}
                for seg in SEGMENTS:
                    if seg in segs:
                        u, si = segs[seg]
                        item = {"format": u.chain[si].name, "inputs": u.inputs}
                    else:
                        rest_u, rest_s = segs.get("rest") or next(iter(segs.values()))
                        item = {"format": rest_u.chain[rest_s].name, "inputs": None}
                    if seg != "rest":
                        item["length"] = meta["lengths"][seg]
                    rule[seg] = item
                entry[kv] = rule
            heads.append(entry)
        layers.append({
            "layer": li, "tau": fmt_number(tau[li]),
            "lipschitz": {"measured": dec_up(float(lips_meas[li])), "margin": fmt_number(req.lipschitz_margin),
                          "value": fmt_number(lips[li])},
            "mlp_lipschitz": {"measured": dec_up(float(mlp_meas[li])), "margin": fmt_number(req.lipschitz_margin),
                              "value": fmt_number(mlps[li])},
            "heads": heads,
        })
    calib = summary["calibration"]
    avg = _avg_bits(units, state)
    total_bits = sum((unit_bits(u, u.chain[s], meta["head_dim"]) for u, s in zip(units, state)),
                     Fraction(0))
    assumptions = [
        {"name": "curvature", "statement": "for every deployment query, kappa_t <= the plan's kappa upper end "
         "(the sup over calibration queries, split by query distance for recent/rest)",
         "value": max((u.inputs["kappa"][1] for u in units), key=parse_number), "margin": "1",
         "provenance": {"calibration_sha256": calib["token_ids_sha256"], "windows": calib["n_windows"],
                        "tokens": calib["n_tokens"], "curvature": meta["curvature"],
                        "queries": int(calib["n_tokens"]) * int(summary["shape"]["query_heads"])}},
        {"name": "ranges", "statement": "every cached key/value lies within the plan's amax, d_token and d_channel "
         "upper ends", "margin": "1", "value": max((u.inputs["amax"][1] for u in units), key=parse_number),
         "provenance": {"calibration_sha256": calib["token_ids_sha256"], "windows": calib["n_windows"]}},
        {"name": "attention mass", "statement": "every deployment query puts at most mass_alpha (and mass_avo) on "
         "each segment, and ||q|| <= q_max", "margin": "1",
         "value": max((u.inputs["mass_alpha"][1] for u in units), key=parse_number),
         "provenance": {"calibration_sha256": calib["token_ids_sha256"], "windows": calib["n_windows"]}},
        {"name": "lipschitz", "statement": "each decoder block is L-Lipschitz on deployment hidden states with L = "
         "measured x margin (the measurement is a power-iteration lower bound of the local Jacobian norm)",
         "margin": fmt_number(req.lipschitz_margin), "value": max((x["lipschitz"]["value"] for x in layers),
                                                                   key=parse_number),
         "provenance": {"calibration_sha256": calib["token_ids_sha256"],
                        "tokens": summary["analysis"]["lipschitz_tokens"],
                        "iterations": summary["analysis"]["lipschitz_iters"]}},
        {"name": "sequence length", "statement": f"sequences are at most max_seq_len = {meta['max_seq_len']} "
         "tokens (the analyzed window)", "margin": "1", "value": str(meta["max_seq_len"]),
         "provenance": {"window": summary["shape"]["positions"]}},
    ]
    plan = {
        "schema_version": 1,
        "kind": "hnfverify-plan",
        "tool": {"name": "hnfverify", "version": __version__},
        "model": {k: str(v) for k, v in summary["model"].items()},
        "calibration": {k: str(v) for k, v in calib.items()},
        "analysis": {"report": report_name, "arrays_sha256": summary["arrays"]["sha256"],
                     "curvature": meta["curvature"], "channel_group": summary["analysis"]["channel_group"]},
        "shape": {k: shape[k] for k in ("layers", "kv_heads", "query_heads", "head_dim")},
        "max_seq_len": meta["max_seq_len"],
        "eps": fmt_number(eps), "eps_source": eps_source,
        "eps_target": fmt_number(req.eps_target) if req.eps_target is not None else None,
        "c": fmt_number(req.c),
        "mode": {**mode, "budget_split": ASSIGNED if mode["kind"] in ("uniform", "assigned")
                 else BUDGET_SPLIT[req.objective] if mode["kind"] == "avg_bits" else EPS_SPLIT
                 + (" " + BUDGET_SPLIT["end_to_end"] if req.eps_target is not None else "")},
        "rule": {"sink": meta["lengths"]["sink"], "recent": meta["lengths"]["recent"]},
        "formats": {n: table[n].to_json() for n in used},
        "layers": layers,
        "assumptions": assumptions,
        "claims": {
            "avg_bits": fmt_number(avg),
            "compression_vs_fp16": dec_down(float(Fraction(16) / avg), 6),
            "cache_bits_at_max_seq_len": fmt_number(total_bits),
            "layer_bounds": [claim_up(b) for b in layer_b],
            "end_to_end_bound": claim_up(e_l),
            "theorem_5_7_violations": sum(1 for us, rhs, dom in stored_form_terms(units, state, req.c)
                                          if dom or (us[0].kv == "K" and eps < rhs)),
        },
    }
    return plan
