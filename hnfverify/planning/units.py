"""Planning units: one (layer, KV head, K|V, segment) with its measured inputs from the report and its
chain of usable formats (docs/design.md §2.3, §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

from ..core.bound import HeadInputs
from ..core.formats import Format, SegmentStats
from ..core.numbers import dec_down, dec_up, parse_number
from ..core.planview import segment_stats
from ..core.semantics import SEGMENTS, StreamRule, segment_bits, segment_lengths, stored_counts
from ..errors import InvalidArgument
from .request import PlanRequest


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
    max_seq_len: int = 0


#: the bits per element at which a channel rest's incomplete group is priced when its chain is ordered: the
#: group waits in the recent format (INT8 per token is typical); plans count the stream's real formats
PENDING_ORDER_BITS = Fraction(17, 2)


def unit_bits(u: Unit, f: Format, d: int = 1) -> Fraction:
    """Bits the unit's segment occupies at max_seq_len in format f (docs/design.md §4, accounting), for
    ordering its chain: a channel rest adds its incomplete group's positions at PENDING_ORDER_BITS (they
    are held in the stream's recent format). Exact totals: :func:`stream_bits`."""
    bits = stored_segment_bits(f, u.seg, u.sink, u.recent, u.max_seq_len, d)
    if u.seg == "rest" and f.granularity == "channel" and u.recent > 0:
        bits += PENDING_ORDER_BITS * pending_positions(f, u.sink, u.recent, u.max_seq_len) * d
    return bits


@lru_cache(maxsize=None)
def pending_positions(rest: Format, sink: int, recent: int, t: int) -> int:
    """Positions past the recent window held in the recent format at t because their channel group of the
    rest format is incomplete."""
    c = stored_counts(StreamRule(sink, recent, {"sink": rest, "recent": rest, "rest": rest}), t)
    return c["recent"] - segment_lengths(sink, recent, t)["recent"]


@lru_cache(maxsize=None)
def stream_bits(formats: tuple, sink: int, recent: int, t: int, d: int = 1) -> Fraction:
    """Bits one stream with (sink, recent, rest) ``formats`` occupies at t positions: the accounting of
    docs/design.md §4 (``semantics.stored_counts``), which the cache's nbytes() and the plan's claims share."""
    rule = StreamRule(sink, recent, dict(zip(SEGMENTS, formats)))
    c = stored_counts(rule, t)
    return sum((segment_bits(f, seg, c, d) for seg, f in zip(SEGMENTS, formats)), Fraction(0))


def stream_formats(us: list, state) -> tuple:
    """The (sink, recent, rest) formats of one stream's units in ``state`` (a segment without a unit is
    empty: it takes a per-token format of the stream, which stores nothing there)."""
    by = {u.seg: u.chain[state[u.idx]] for u in us}
    filler = next((f for f in by.values() if f.granularity != "channel"), None) or next(iter(by.values()))
    return tuple(by.get(seg, filler) for seg in SEGMENTS)


def streams_of(units: list) -> list:
    """The units grouped by stream (layer, KV head, K|V)."""
    out: dict = {}
    for u in units:
        out.setdefault((u.layer, u.head, u.kv), []).append(u)
    return list(out.values())


def total_bits(units: list, state, d: int = 1) -> Fraction:
    """Bits of the whole cache at max_seq_len in ``state``: the sum of :func:`stream_bits`."""
    out = Fraction(0)
    for us in streams_of(units):
        u = us[0]
        out += stream_bits(stream_formats(us, state), u.sink, u.recent, u.max_seq_len, d)
    return out


@lru_cache(maxsize=None)
def stored_segment_bits(f: Format, seg: str, sink: int, recent: int, t: int, d: int) -> Fraction:
    rule = StreamRule(sink, recent, {"sink": f, "recent": f, "rest": f})
    return segment_bits(f, seg, stored_counts(rule, t), d)


def interval(lo: float, hi: float) -> list:
    return [dec_down(max(lo, 0.0)), dec_up(max(hi, 0.0))]


def theorem_term(fmt: Format, unit: Unit, c: Fraction) -> Fraction:
    """c kappa_hi D^2 u: Theorem 5.7 holds for this unit and format iff eps >= this."""
    d = fmt.theorem_diameter(unit.stats)
    return c * unit.kappa[1] * d * d * fmt.u


def build_chain(unit: Unit, table: dict, c: Fraction) -> None:
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
    set_errors(unit)


def set_errors(unit: Unit) -> None:
    unit.errors = [f.l2_error(unit.stats) for f in unit.chain]
    # the error is affine in the prior (recent) error for every format but FP8's scale floor: a secant
    # slope over [0, 1] is enough for the search; decisions are checked with the exact bound
    unit.slopes = [float(f.l2_error(unit.stats.widened(Fraction(1))) - e) + 1.0 if unit.seg == "rest" else 0.0
                   for f, e in zip(unit.chain, unit.errors)]


def units_from_report(summary: dict, arrays: dict, req: PlanRequest, table: dict,
                      channel_group: int | None = None) -> tuple[list, dict]:
    """``channel_group``: the group whose measured diameters the units' d_channel takes (None: the analysis')."""
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
    lengths = segment_lengths(req.sink, req.recent, t)
    curvature = req.curvature or summary["analysis"]["curvature"]
    s = min(req.sink, t)
    pos = {"sink": slice(0, s), "recent": slice(s, t), "rest": slice(s, t)}
    seg_idx = {"sink": 0, "recent": 1, "rest": 2}
    group = channel_group or summary["analysis"]["channel_group"]
    ch_field = "{}_d_channel" if group == summary["analysis"]["channel_group"] else "{}_d_channel_g%d" % group
    units = []
    for li in range(n_l):
        for h in range(n_h):
            for kv in ("K", "V"):
                p = kv.lower()
                amax_arr = np.maximum(np.abs(arrays[f"{p}_tok_min"][li, h]), np.abs(arrays[f"{p}_tok_max"][li, h]))
                rot = f"{p}_rot_min" in arrays          # the rotated formats' ranges (docs/design.md §2.3c)
                if rot:
                    amax_h_arr = np.maximum(np.abs(arrays[f"{p}_rot_min"][li, h]), np.abs(arrays[f"{p}_rot_max"][li, h]))
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
                    d_tok, d_ch, amax = mx(arrays[f"{p}_d_token"][li, h]), mx(arrays[ch_field.format(p)][li, h]), \
                        float(np.max(amax_arr[sl]))
                    ma = arrays["mass_alpha_hi"][li, si, ri, seg_idx[seg], h]
                    ma_lo = arrays["mass_alpha_lo"][li, si, ri, seg_idx[seg], h]
                    mv = arrays["mass_avo_hi"][li, si, ri, seg_idx[seg], h]
                    mv_lo = arrays["mass_avo_lo"][li, si, ri, seg_idx[seg], h]
                    inputs = {
                        "kappa": interval(k_lo, k_hi),
                        "d_token": interval(d_tok, d_tok), "d_channel": interval(d_ch, d_ch), "amax": interval(amax, amax),
                        "alpha": interval(mx(arrays["alpha_max_lo"][li, h]), mx(arrays["alpha_max_hi"][li, h])),
                        "qnorm": interval(mx(arrays["qnorm_max_lo"][li, h]), mx(arrays["qnorm_max_hi"][li, h])),
                        "vo": interval(mx(arrays["vo_max_lo"][li, h]), mx(arrays["vo_max_hi"][li, h])),
                        "mass_alpha": interval(float(ma_lo), float(ma)), "mass_avo": interval(float(mv_lo), float(mv)),
                    }
                    if rot:
                        d_h, amax_h = mx(arrays[f"{p}_d_token_h"][li, h]), float(np.max(amax_h_arr[sl]))
                        inputs["d_token_h"], inputs["amax_h"] = interval(d_h, d_h), interval(amax_h, amax_h)
                    stats = segment_stats(inputs, d)
                    kap = (parse_number(inputs["kappa"][0]), parse_number(inputs["kappa"][1]))
                    units.append(Unit(li, h, kv, seg, lengths[seg], stats, kap, inputs, sink=req.sink,
                                      recent=req.recent, max_seq_len=t))
    meta = {"max_seq_len": t, "lengths": lengths, "curvature": curvature, "head_dim": d, "channel_group": group}
    return units, meta


def head_inputs(units_lh: list, tau: Fraction, q_max: Fraction) -> HeadInputs:
    keys = {u.seg: u.stats for u in units_lh if u.kv == "K"}
    values = {u.seg: u.stats for u in units_lh if u.kv == "V"}
    mass_alpha = {u.seg: parse_number(u.inputs["mass_alpha"][1]) for u in units_lh if u.kv == "K"}
    mass_avo = {u.seg: parse_number(u.inputs["mass_avo"][1]) for u in units_lh if u.kv == "K"}
    spread = {u.seg: parse_number(u.inputs["vo"][1]) for u in units_lh if u.kv == "K"}
    return HeadInputs(tau, q_max, keys, values, mass_alpha, mass_avo, spread)
