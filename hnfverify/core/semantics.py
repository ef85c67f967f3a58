"""What a rule plan means at run time: which stored form of position t a query reads.

This module is the one definition (docs/design.md, section 4) used by the planner, the checker's
obligations, the runtime cache and the teacher-forced evaluation. ``hnfverify.core.recheck`` keeps its
own, separately written copy (a test cross-checks the two). No torch, no numpy.

One stream = one (layer, KV head, K|V) of a rule plan: sink length S, recent length R, formats for
the segments sink / recent / rest. Positions are token positions of one sequence (0 = its first
token). The cache is updated in *chunks*: a chunk writes positions [a, b) and its queries are
a .. b-1 (the prefill is the first chunk; plain decoding has chunks of one token). While a chunk's
queries read the cache, the stream is laid out relative to the chunk's *oldest* query a
(:func:`layout`):

  [0, sink_end)               SINK        stored once in the sink format
  [sink_end, rest_end)        REST        stored in the recent format, re-quantized to the rest
                                          format when it left the window (R = 0: rest format only)
  [rest_end, recent_start)    pending     left the window, waiting for its channel group to be
                                          complete: its recent value kept as FP32 (R = 0: exact)
  [recent_start, a)           recent      in the recent format
  [a, b)                      EXACT       the chunk's own keys and values, exact

A query i of the chunk reads a recent position t as RECENT if i - t < R and as RECENT_FAR otherwise
(a multi-token chunk reads its older recent positions from up to b - 1 - t away); a pending position
is read as RECENT_FAR. Positions leave the window only relative to the oldest query (a - t >= R), so
no query reads a rest-format value at distance < R, and a draft chunk can be cropped while its
positions are still recent. Channel groups of the rest format are aligned at absolute multiples of
the group size G, the analysis' alignment; the group that straddles S starts at S (a subset of the
analyzed group, so its diameter is bounded by the analysis'). An empty recent window (R = 0) means
no recent copy ever exists: positions go straight to the rest format (or pending, exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    """The stored form a query reads. The value is the obligation-id suffix."""

    SINK = "sink"
    RECENT = "recent"
    RECENT_FAR = "recent-far"
    REST = "rest"


# the segment whose plan inputs (kappa, ranges, attention mass) describe the readers of a state:
# near queries read RECENT, far queries (distance >= R) read RECENT_FAR and REST
READER = {State.SINK: "sink", State.RECENT: "recent", State.RECENT_FAR: "rest", State.REST: "rest"}
STATES = (State.SINK, State.RECENT, State.RECENT_FAR, State.REST)
SEGMENTS = ("sink", "recent", "rest")


@dataclass(frozen=True)
class StreamRule:
    """sink: S, recent: R, formats: segment name -> format object (anything with ``granularity`` and
    ``group``; ``hnfverify.core.formats.Format`` in practice)."""

    sink: int
    recent: int
    formats: dict

    @property
    def channel_group(self) -> int | None:
        f = self.formats["rest"]
        return f.group if f.granularity == "channel" else None

    def chain(self, state: State) -> tuple:
        """The formats a value in ``state`` passed through, in order (empty: stored exactly)."""
        f = self.formats
        if state is State.SINK:
            return (f["sink"],)
        if state is State.RECENT:
            return (f["recent"],)
        if state is State.RECENT_FAR:
            return (f["recent"],) if self.recent > 0 else ()
        return (f["recent"], f["rest"]) if self.recent > 0 else (f["rest"],)


@dataclass(frozen=True)
class Layout:
    """Where each stored form lies while queries >= ``oldest`` read the stream (see module doc)."""

    sink_end: int
    rest_end: int
    recent_start: int
    oldest: int


def layout(rule: StreamRule, oldest: int) -> Layout:
    """The stream's layout for a chunk whose oldest query is ``oldest`` (= positions stored before it)."""
    a = oldest
    sink_end = min(rule.sink, a)
    if rule.recent > 0:
        recent_start = max(sink_end, a - rule.recent + 1)
    else:
        recent_start = a
    g = rule.channel_group
    if g is None:
        rest_end = recent_start
    else:
        rest_end = max(sink_end, (recent_start // g) * g)
    return Layout(sink_end, rest_end, recent_start, a)


def read_state(rule: StreamRule, lay: Layout, t: int, query: int) -> State | None:
    """The form query ``query`` (>= lay.oldest) reads position t in; None: exact (t in the chunk)."""
    if t >= lay.oldest:
        return None
    if t < lay.sink_end:
        return State.SINK
    if t < lay.rest_end:
        return State.REST
    if t < lay.recent_start:
        return State.RECENT_FAR
    return State.RECENT if query - t < rule.recent else State.RECENT_FAR


def read_intervals(rule: StreamRule, lay: Layout, query: int) -> list:
    """[(lo, hi, state or None)] covering positions [0, query]: what ``query`` reads, piecewise."""
    out = []

    def add(lo, hi, st):
        if hi > lo:
            out.append((lo, hi, st))

    add(0, lay.sink_end, State.SINK)
    add(lay.sink_end, lay.rest_end, State.REST)
    add(lay.rest_end, lay.recent_start, State.RECENT_FAR)
    near = max(lay.recent_start, query - rule.recent + 1)
    add(lay.recent_start, min(near, lay.oldest), State.RECENT_FAR)
    add(max(near, lay.recent_start), lay.oldest, State.RECENT)
    add(lay.oldest, query + 1, None)
    return out


def reachable(rule: StreamRule, max_seq_len: int) -> list:
    """[(state, lo, hi)]: every state some query < max_seq_len can read, with the positions that can
    be read in it (a superset for RECENT_FAR, whose chunks depend on how the cache is driven)."""
    t, s, r = max_seq_len, min(rule.sink, max_seq_len), rule.recent
    out = []
    if s > 0:
        out.append((State.SINK, 0, s))
    if r >= 2 and t - 1 > s:                       # read at distance 1 .. R-1
        out.append((State.RECENT, s, t - 1))
    if t - r > s:                                  # read at distance >= R
        if rule.chain(State.RECENT_FAR):
            out.append((State.RECENT_FAR, s, t - r))
        lay = layout(rule, t - 1)
        if lay.rest_end > s:
            out.append((State.REST, s, lay.rest_end))
    return out


def segment_lengths(sink: int, recent: int, n: int) -> dict:
    """Lengths of the plan's segments at n positions: the split used for accounting and inputs."""
    s = min(sink, n)
    r = min(recent, max(0, n - s))
    return {"sink": s, "recent": r, "rest": max(0, n - s - r)}


def stored_counts(rule: StreamRule, n: int) -> dict:
    """What the cache holds at n positions after the prefill or a one-token step (its steady state):
    {"sink", "recent", "rest", "pending"} position counts and "rest_groups", the sizes of the rest
    format's channel groups (empty for per-token rest formats). "recent": positions held in the recent
    format — with R > 0 the window and the positions past it whose channel group is not complete
    (RECENT_FAR, docs/design.md §4); "pending": exact FP32 positions (R = 0, channel rest)."""
    if n <= 0:
        return {"sink": 0, "recent": 0, "rest": 0, "pending": 0, "rest_groups": []}
    lay = layout(rule, n - 1)
    s = min(rule.sink, n)
    if rule.recent > 0:
        recent = n - lay.rest_end if n - 1 >= rule.sink else 0
        rest, pending = lay.rest_end - lay.sink_end, 0
    else:
        recent = 0
        end = n if rule.channel_group is None else lay.rest_end
        rest, pending = max(0, end - s), max(0, n - max(end, s))
    return {"sink": s, "recent": recent, "rest": rest, "pending": pending,
            "rest_groups": channel_groups(rule, s, s + rest)}


def channel_groups(rule: StreamRule, lo: int, hi: int) -> list:
    """Sizes of the rest format's channel groups covering [lo, hi) (absolute alignment; the first may
    start late at the sink boundary). Empty for per-token rest formats."""
    g = rule.channel_group
    if g is None or hi <= lo:
        return []
    out, t = [], lo
    while t < hi:
        end = min(hi, (t // g + 1) * g)
        out.append(end - t)
        t = end
    return out


#: bits the cache spends per stored position and stream on the recorded error norm when the plan's rule has
#: ``error_norms`` (docs/design.md §4.1): one byte, a code of an upper bound of ||x~_t - x_t||.
NORM_BITS = 8


def norm_bits(plan_rule: dict) -> int:
    """NORM_BITS if the plan's ``rule`` records error norms, else 0."""
    return NORM_BITS if plan_rule.get("error_norms") == "u8log" else 0


def segment_bits(fmt, seg: str, counts: dict, d: int):
    """Bits one segment of a stream occupies for ``counts`` (from :func:`stored_counts`): packed values,
    scales and zero-points (one set per channel group, whatever its size), FP32 pending copies."""
    from fractions import Fraction

    from .formats import packed_row_bytes

    if seg != "rest":
        return Fraction(fmt.bits_per_element) * counts[seg] * d
    pending = 32 * counts["pending"] * d
    if fmt.granularity == "channel":             # each channel's values of a group packed to whole bytes
        groups = counts["rest_groups"]
        return (sum(packed_row_bytes(fmt.value_bits, m) * 8 for m in groups) + fmt.overhead_bits * len(groups)) * d + pending
    return Fraction(fmt.bits_per_element) * counts["rest"] * d + pending
