"""The greedy search's float twins of the exact bounds (docs/design.md §2.4): they only order the
moves; every decision the planner keeps is re-checked with the exact bound (``hnfverify.core.bound``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .units import stream_bits, stream_formats, streams_of, total_bits


@dataclass(frozen=True)
class FloatHead:
    tau: float
    q_max: float
    segs: tuple
    mass_alpha: tuple
    mass_avo: tuple
    spread: tuple


def float_head_error(fh: FloatHead, dk: tuple, dv: tuple) -> float:
    """E_h of docs/design.md §2.4 in floats; dk, dv: per-segment error bounds in fh.segs order."""
    n = len(fh.segs)
    if not n:
        return 0.0
    m = [fh.tau * fh.q_max * x for x in dk]
    big = max(m)
    e = [math.exp(min(m[i] + big, 700.0)) for i in range(n)]
    first = min(sum(min(1.0, e[i] * fh.mass_alpha[i]) * dv[i] for i in range(n)), max(dv))
    order1 = sum((e[i] - 1.0) * fh.mass_avo[i] for i in range(n))
    tv = 2.0 * math.tanh(min(big, 700.0) / 2) * max(fh.spread)
    return first + min(order1, tv)


def float_head_linear(fh: FloatHead, dk: tuple, dv: tuple) -> float:
    """The bound's first-order Taylor term in the errors (exp(x) -> 1 + x, dV * dK dropped):
    sum dV A + (m + M) B. Not a bound; the planner's ``--objective linear`` ranks moves by it."""
    m = [fh.tau * fh.q_max * x for x in dk]
    big = max(m) if m else 0.0
    return sum(dv[i] * fh.mass_alpha[i] + (m[i] + big) * fh.mass_avo[i] for i in range(len(fh.segs)))


class GreedySearch:
    """Float twin of the exact bound for the greedy sequence. ``objective``: "bound" (E_h), "linear" (its
    first-order terms) or "fisher" (``costs``: per unit and chain entry, the measured KL estimate of
    ``planning.sensitivity``, summed over a head's units, unweighted)."""

    def __init__(self, units, heads, weights, amp, objective="bound", costs=None):
        self.units = units
        self.costs = costs if objective == "fisher" else None
        if objective == "fisher" and costs is None:
            raise ValueError("the fisher objective needs the units' costs")
        self.err_fn = {"bound": float_head_error, "linear": float_head_linear, "fisher": None}[objective]
        self.by_lh: dict = {}
        for i, u in enumerate(units):
            self.by_lh.setdefault((u.layer, u.head), []).append(i)
        self.heads = heads                  # (l, h) -> FloatHead
        self.w = weights                    # (l, h) -> o_norm sqrt(G) (float)
        self.amp = amp                      # layer -> P_l (float)
        self.errf = [[float(e) for e in u.errors] for u in units]
        self.slope = [u.slopes for u in units]
        assert all(units[u.idx] is u for u in units), "units[i].idx must be i"
        self.stream = {u.idx: us for us in streams_of(units) for u in us}   # unit -> its stream's units

    def stream_bits(self, i: int, state) -> float:
        """Bits of unit i's stream in ``state`` (its recent format holds a channel rest's incomplete group)."""
        us = self.stream[i]
        u = us[0]
        return float(stream_bits(stream_formats(us, state), u.sink, u.recent, u.max_seq_len))

    def head_error(self, lh, state) -> float:
        idx = self.by_lh[lh]
        if self.costs is not None:
            return sum(self.costs[i][state[i]] for i in idx)
        fh = self.heads[lh]
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
        """The upgrade with the largest bound decrease per bit; where none decreases the bound (its mins and
        maxima have plateaus, docs/design.md §2.4), the one with the largest decrease of the unit's own error
        per bit, scored below every real decrease, so a greedy sequence always reaches the finest formats."""
        best, plateau = None, None
        scale = 1.0 if self.costs is not None else self.amp[lh[0]] * self.w[lh]
        for i in self.by_lh[lh]:
            for j in range(state[i] + 1, len(self.units[i].chain)):
                old = state[i]
                before = self.stream_bits(i, state)
                state[i] = j
                cost = self.stream_bits(i, state) - before
                if cost <= 0:
                    state[i] = old
                    continue
                e = self.head_error(lh, state)
                state[i] = old
                gain = scale * (cur_err - e)
                if gain <= 0:
                    own = (self.errf[i][old] - self.errf[i][j]) / cost
                    if own > 0 and (plateau is None or own > plateau[0]):
                        plateau = (own, i, j, e)
                    continue
                score = gain / cost
                if best is None or score > best[0]:
                    best = (score, i, j, e)
        if best is None and plateau is not None:
            return (0.0, plateau[1], plateau[2], plateau[3])
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


def norm_overhead(req, d: int) -> Fraction:
    """Per-element bits of the recorded error norms (docs/design.md §4.1) when the request keeps them."""
    from ..core.semantics import NORM_BITS

    return Fraction(NORM_BITS, d) if req.error_norms else Fraction(0)


def average_bits(units, state, overhead: Fraction = Fraction(0)) -> Fraction:
    """Bits per element of the cache at max_seq_len; ``overhead``: per-element bits on top (the error norms)."""
    tot = sum(u.length for u in units)
    return total_bits(units, state) / tot + overhead
