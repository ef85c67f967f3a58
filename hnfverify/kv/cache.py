"""MixedPrecisionCache: a transformers ``Cache`` that stores exactly what a plan says, laid out for speed.

Per layer, KV head and K|V the stream is laid out as docs/design.md §4 defines (``hnfverify.core.semantics``,
the definition the checker's obligations cover): positions t < S in the sink format; the recent
window in the recent format; older positions re-quantized from their recent value into the rest
format when they leave the window relative to the oldest query of a chunk — per token, or per
complete channel group (aligned at multiples of G, as the analysis groups them), the incomplete
group kept in the recent format it is read in (its codes stay where they are). With R = 0 positions go
straight to the rest (to a channel rest when their group is complete, exact FP32 until then).
Storage is packed (``hnfverify.kv.quant``); ``nbytes()`` counts it all. Each ``update`` returns the
dequantized past (float32) with the chunk's own K/V exact; the prefill returns its K/V exact.
With the plan's ``error_norms`` each stream also records, per position, a one-byte upper bound of its
stored value's error norm (``hnfverify.kv.norms``, docs/design.md §4.1), counted in ``nbytes()``;
``hnfverify.kv.certify`` turns them into a certified attention-error bound at every step.

The layout (docs/design.md §4.2): the streams of a layer whose layouts move together (same S, R and
rest channel group) form a *lane*; within a lane, the streams that share a segment's format share one
preallocated packed buffer (:class:`_Buf`: appends and evictions write in place, capacity grows by
half). A step dequantizes each buffer once, straight into the layer's output tensor: a handful of
tensor ops per (layer, format) instead of per (layer, head, K|V, segment, channel group).

    cache = MixedPrecisionCache.from_plan(plan, model)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=200)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import InvalidArgument
from ..core.semantics import SEGMENTS, StreamRule, channel_groups, layout
from . import norms
from .codecs import IntCodec
from .quant import Packed, dequantize_into, quantize_values

_MIN_CAP = 16


class _Buf:
    """Tensors of several streams that share axis 2 (tokens, or channel groups), live in [lo, hi) of it.

    ``append`` writes in place; ``drop_front`` moves ``lo``; when the end of the capacity is reached the
    live part moves to the front if that frees at least half, else the capacity grows by half. A buffer
    whose live part fell below a quarter of its capacity is shrunk (a prefill's recent copies leave it)."""

    __slots__ = ("ts", "lo", "hi")

    def __init__(self):
        self.ts: tuple | None = None
        self.lo = self.hi = 0

    @property
    def n(self) -> int:
        return self.hi - self.lo

    def _cap(self) -> int:
        return 0 if self.ts is None else next(t for t in self.ts if t is not None).shape[2]

    def _realloc(self, cap: int) -> None:
        live = [None if t is None else t[:, :, self.lo:self.hi] for t in self.ts]
        new = []
        for t, lv in zip(self.ts, live):
            if t is None:
                new.append(None)
                continue
            u = t.new_empty(t.shape[:2] + (cap,) + t.shape[3:])
            u[:, :, :self.n] = lv
            new.append(u)
        self.ts, self.hi, self.lo = tuple(new), self.n, 0

    def append(self, parts: tuple) -> None:
        """parts: tensors (B, h, m, ...) (None where the format has no such tensor)."""
        ref = next(p for p in parts if p is not None)
        m = ref.shape[2]
        if m == 0:
            return
        if self.ts is None:
            self.ts = tuple(None if p is None else p.new_empty(p.shape[:2] + (max(m, _MIN_CAP),) + p.shape[3:])
                            for p in parts)
            self.lo = self.hi = 0
        cap = self._cap()
        if self.hi + m > cap:
            need = self.n + m
            self._realloc(cap if 2 * need <= cap else max(need, cap + cap // 2))
        for t, p in zip(self.ts, parts):
            if t is not None:
                t[:, :, self.hi:self.hi + m] = p
        self.hi += m

    def view(self, a: int = 0, b: int | None = None, rows: slice | None = None) -> tuple:
        """The live tensors' slice [a, b) (live coordinates), of rows ``rows`` (axis 1; None: all), one
        indexing op per tensor."""
        b = self.n if b is None else b
        pos = slice(self.lo + a, self.lo + b)
        if rows is None:
            return tuple(None if t is None else t[:, :, pos] for t in self.ts)
        return tuple(None if t is None else t[:, rows, pos] for t in self.ts)

    def drop_front(self, m: int) -> None:
        self.lo += m
        if self.lo >= self.hi:
            self.lo = self.hi = 0
        if self.ts is not None and self._cap() > 4 * max(self.n, _MIN_CAP):
            self._realloc(2 * max(self.n, _MIN_CAP))

    def truncate(self, m: int) -> None:
        """Keep the first m live entries."""
        if m <= 0:
            self.lo = self.hi = 0
        elif m < self.n:
            self.hi = self.lo + m

    def reorder(self, idx: torch.Tensor) -> None:
        if self.ts is None:
            return
        self.ts = tuple(None if t is None else t[:, :, self.lo:self.hi].index_select(0, idx.to(t.device))
                        for t in self.ts)
        self.lo, self.hi = 0, self.n

    def capacity_nbytes(self) -> int:
        return 0 if self.ts is None else sum(t.numel() * t.element_size() for t in self.ts if t is not None)

    def nbytes(self) -> int:
        if self.ts is None or not self.n:
            return 0
        total = 0
        for t in self.ts:
            if t is not None:
                total += t[:, :, :1].numel() * self.n * t.element_size()
        return total


def _index(ids: list):
    """A slice where the ids are consecutive (a view), else a LongTensor."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return torch.tensor(ids, dtype=torch.long)


def _take(x: torch.Tensor, idx) -> torch.Tensor:
    return x if idx is None else (x[:, idx] if isinstance(idx, slice) else x.index_select(1, idx))


def _write(out: torch.Tensor, idx, lo: int, n: int, fill) -> None:
    """``fill(dst)`` writes (B, h, n, d) values; they go to streams ``idx`` (slice or LongTensor; None: all) of
    ``out``, positions [lo, lo + n) — straight into ``out`` where idx is a slice, through a copy otherwise."""
    if idx is None or isinstance(idx, slice):
        fill(out[:, idx if idx is not None else slice(None), lo:lo + n])
    else:
        tmp = out.new_empty(out.shape[0], len(idx), n, out.shape[-1])
        fill(tmp)
        out[:, idx, lo:lo + n] = tmp


def _rows(ts: tuple, rows: slice | None) -> tuple:
    """Rows ``rows`` (axis 1) of each tensor of ts (None entries stay None; rows None: all)."""
    return ts if rows is None else tuple(None if t is None else t[:, rows] for t in ts)


def _rows_by_layer(ids: list, per_layer: int, layers: list) -> dict:
    """For sorted row ids (k * per_layer + stream for the k-th layer in ``layers``): layer -> (slice of the
    rows holding its streams, their stream ids within the layer as a slice or LongTensor)."""
    out: dict = {}
    for row, i in enumerate(ids):
        out.setdefault(layers[i // per_layer], []).append((row, i % per_layer))
    return {li: (slice(rs[0][0], rs[-1][0] + 1), _index([j for _, j in rs])) for li, rs in out.items()}


class _Group:
    """The streams of one lane that store one segment in one format: one buffer (B, rows, cap, ...), the
    rows in global stream order. ``sub``: their rows in the lane (None: all of it); ``rows``: layer ->
    (its rows here, its stream ids)."""

    __slots__ = ("fmt", "sub", "rows", "d", "buf", "partial")

    def __init__(self, fmt, sub, rows: dict, d: int):
        self.fmt, self.sub, self.rows, self.d = fmt, sub, rows, d
        self.buf = _Buf()
        self.partial: Packed | None = None     # a channel rest's first group, when it starts late at S

    def tokens(self, a: int = 0, b: int | None = None) -> int:
        """Positions held by live entries [a, b) of the buffer (a channel group holds fmt.group of them)."""
        n = (self.buf.n if b is None else b) - a
        return n * self.fmt.group if self.fmt.granularity == "channel" else n

    def fill(self, dst: torch.Tensor, a: int = 0, b: int | None = None, rows: slice | None = None) -> None:
        """The stored values of live entries [a, b) of ``rows`` (all: None), dequantized into dst (B, h, n, d).
        Full channel groups are held token-major (``IntCodec.token_major``), per-token formats as packed."""
        data, scale, zero = self.buf.view(a, b, rows)
        if self.fmt.granularity == "channel":
            IntCodec.token_major_into(self.fmt, data, scale, zero, dst)
        else:                                     # data (B, h, tokens, packed d)
            dequantize_into(Packed(self.fmt, tuple(dst.shape), data, scale, zero), dst)

    def fill_partial(self, dst: torch.Tensor, rows: slice | None = None) -> None:
        """The short first channel group (kept channel-major), dequantized into dst."""
        p = self.partial
        dequantize_into(Packed(p.fmt, tuple(dst.shape), *_rows((p.data, p.scale, p.zero), rows)), dst)


class _Lane:
    """The streams of the model whose layouts move together (docs/design.md §4.2): same sink S, recent R
    and rest channel group G, from every layer (global ids layer * 2 Hkv + stream, sorted). Positions, in
    order: sink [0, S), rest [S, rest_end), pending [rest_end, recent_start), recent [recent_start,
    length). With R > 0 the recent buffers hold pending and recent positions, [rest_end, length), in the
    recent format; with R = 0 ``pending`` holds the exact FP32 positions of an incomplete channel group.
    ``oldest``: the query the layout is for. ``codes`` (B, rows, length) uint8: the recorded
    error norms (``record``)."""

    def __init__(self, ids: list, rules: list, d: int, per_layer: int, layers: list, record: bool):
        self.rule: StreamRule = rules[0]
        self.key = (self.rule.sink, self.rule.recent, self.rule.channel_group)
        self.ids, self.sel, self.record, self.d = ids, _index(ids), record, d
        self.h = len(ids)
        self.rows = _rows_by_layer(ids, per_layer, layers)
        self.groups = {}
        for seg in SEGMENTS:
            by_fmt: dict = {}
            for i, r in enumerate(rules):
                by_fmt.setdefault(r.formats[seg].name, (r.formats[seg], []))[1].append(i)
            self.groups[seg] = [
                _Group(fmt, None if places == list(range(self.h)) else _index(places),
                       _rows_by_layer([ids[i] for i in places], per_layer, layers), d)
                for fmt, places in by_fmt.values()]
        self.pending = _Buf()
        self.codes = _Buf()
        self.rest_end = self.recent_start = self.length = self.oldest = 0
        self.version = 0              # bumped by every change of what is stored or how it is laid out
        self.window = None            # (version, sink, tail): see prepare_window

    # ---- sizes
    def _n(self, seg: str) -> int:
        g = self.groups[seg][0]
        return g.buf.n * (g.fmt.group if g.fmt.granularity == "channel" else 1) + (
            g.partial.shape[-2] if g.partial is not None else 0)

    # ---- writing
    def _store(self, seg: str, x: torch.Tensor, group_tokens: int | None = None):
        """Quantize x (B, h, m, d) into the segment's formats; the float64 (B, h, m) error norms (record)."""
        err = None
        if self.record and len(self.groups[seg]) > 1:
            err = torch.empty(x.shape[:3], dtype=torch.float64)
        for g in self.groups[seg]:
            xs = _take(x, g.sub)
            p, y = quantize_values(xs, g.fmt, group_tokens=group_tokens)
            if group_tokens is not None and group_tokens < g.fmt.group:
                assert g.partial is None, "only the rest's first channel group can start late"
                g.partial = p
            elif g.fmt.granularity == "channel":    # full groups are held token-major (read without a transpose)
                g.buf.append((IntCodec.token_major(p), p.scale, p.zero))
            else:
                g.buf.append((p.data, p.scale, p.zero))
            if self.record:
                e = norms.error_norm(y, xs)
                if err is None:
                    err = e
                elif isinstance(g.sub, slice):
                    err[:, g.sub] = e
                else:
                    err.index_copy_(1, g.sub, e)
        return err

    def _chain(self, lo: int, stage: torch.Tensor) -> None:
        if self.record:
            c = self.codes.view(lo, lo + stage.shape[-1])[0]
            c.copy_(norms.chained(c, stage))

    def append(self, x: torch.Tensor) -> None:
        """x: (B, h, n, d) float32, positions length .. length + n - 1 (a chunk; its queries read it exactly)."""
        n, start, r = x.shape[2], self.length, self.rule
        self.version += 1
        n_sink = max(0, min(n, r.sink - start))
        errs = []
        if n_sink:
            errs.append(self._store("sink", x[:, :, :n_sink]))
        tail = x[:, :, n_sink:]
        if tail.shape[2]:
            if self._n("recent") == 0 and self.pending.n == 0 and self._n("rest") == 0:
                self.rest_end = self.recent_start = start + n_sink
            if r.recent > 0:
                errs.append(self._store("recent", tail))
            elif r.channel_group is None:           # R = 0: straight to the per-token rest format
                errs.append(self._store("rest", tail))
                self.rest_end = self.recent_start = start + n
            else:                                   # R = 0: exact until the channel group is complete
                self.pending.append((tail,))
                self.recent_start = start + n
                if self.record:
                    errs.append(torch.zeros(tail.shape[:3], dtype=torch.float64))
        if self.record:
            e = errs[0] if len(errs) == 1 else torch.cat(errs, dim=-1)
            self.codes.append((norms.encode_up(e),))
        self.length += n

    def relayout(self, oldest: int) -> None:
        """Lay the lane out for queries >= ``oldest`` (docs/design.md §4): positions with oldest - t >= R
        leave the recent window; complete channel groups are quantized to the rest."""
        r = self.rule
        lay = layout(r, oldest)
        self.oldest = oldest
        self.version += 1
        if self.length <= r.sink:
            return
        if r.recent > 0:
            # positions that leave the window stay in the recent buffers, in the recent format they are read
            # in, until they move to the rest: per token at once, per channel group when it is complete
            self.recent_start = max(self.recent_start, lay.recent_start)
            sizes = channel_groups(r, self.rest_end, lay.rest_end) if r.channel_group is not None else \
                [lay.rest_end - self.rest_end] if lay.rest_end > self.rest_end else []
            for size in sizes:
                chunk = self._read("recent", 0, size)
                for g in self.groups["recent"]:
                    g.buf.drop_front(size)
                stage = self._store("rest", chunk, group_tokens=size if r.channel_group is not None else None)
                if self.record:
                    self._chain(self.rest_end, stage)
                self.rest_end += size
            return
        if self.pending.n == 0 or lay.rest_end <= self.rest_end:
            return
        for size in channel_groups(r, self.rest_end, lay.rest_end):    # R = 0: exact until a group is complete
            chunk = self.pending.view(0, size)[0]
            stage = self._store("rest", chunk, group_tokens=size)
            if self.record:
                self._chain(self.rest_end, stage)
            self.pending.drop_front(size)
            self.rest_end += size

    def crop(self, keep: int) -> None:
        """Drop positions >= keep: allowed while they are all still recent (or, with R = 0, pending or in
        a per-token rest), i.e. keep >= the query the layout was made for (docs/design.md §4)."""
        if keep >= self.length:
            return
        self.version += 1
        if keep < self.oldest:
            raise InvalidArgument(f"crop to {keep} positions: positions from {self.oldest - self.rule.recent} on "
                                  f"already left the recent window for a query at {self.oldest}; a plan cache can only "
                                  f"crop back to position {self.oldest} or later")
        r = self.rule
        if keep < r.sink:
            for g in self.groups["sink"]:
                g.buf.truncate(keep)
        if r.recent > 0:                            # the recent buffers hold [rest_end, length)
            for g in self.groups["recent"]:
                g.buf.truncate(keep - self.rest_end)
        elif r.channel_group is not None:           # R = 0: the chunk's positions are pending, exact
            self.pending.truncate(keep - self.rest_end)
            self.recent_start = max(keep, self.rest_end)
        else:                                       # R = 0, per-token rest: stored one by one from S on
            for g in self.groups["rest"]:
                g.buf.truncate(keep - r.sink)
            self.rest_end = self.recent_start = max(keep, r.sink)
        self.codes.truncate(keep)
        self.length = keep

    # ---- reading
    def _read(self, seg: str, a: int = 0, b: int | None = None, dst: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, n, d) float32: live entries [a, b) of a per-token segment, every stream of the lane (into dst)."""
        gs = self.groups[seg]
        if dst is None:
            ref = gs[0].buf.view()[0]
            dst = torch.empty(ref.shape[0], self.h, gs[0].tokens(a, b), self.d)
        for g in gs:
            _write(dst, g.sub, 0, dst.shape[2], lambda t, g=g: g.fill(t, a, b))
        return dst

    def prepare_window(self) -> None:
        """Dequantize the small segments of every layer at once — the sink, and the pending and recent
        positions [rest_end, length) — into transient float32 tensors the layers of this forward pass copy
        their rows from (one copy each instead of a dequantization per format). Valid until the next change."""
        if not self.length:
            return
        sink = self._read("sink") if self._n("sink") else None
        n_t = self.length - self.rest_end if self.length > self.rule.sink else 0
        tail = None
        if n_t > 0 and (self.pending.n or self._n("recent")):
            b = (self.pending.view()[0] if self.pending.n else self.groups["recent"][0].buf.view()[0]).shape[0]
            tail = torch.empty(b, self.h, n_t, self.d)
            if self.pending.n:                      # R = 0: exact positions of an incomplete channel group
                tail[:, :, :self.pending.n] = self.pending.view()[0]
            if self._n("recent"):                   # R > 0: the recent buffers hold [rest_end, length)
                self._read("recent", dst=tail)
        self.window = (self.version, sink, tail)

    def read_into(self, out: torch.Tensor, a: int, li: int) -> None:
        """Write layer li's stored values of positions [0, a) into out (B, 2 Hkv, >= a, d)."""
        if li not in self.rows:
            return
        r = self.rule
        win = self.window if self.window is not None and self.window[0] == self.version else None

        def put(g, rows, idx, lo, n):
            _write(out, idx, lo, n, lambda t: g.fill(t, 0, n if g.fmt.granularity != "channel" else None, rows))

        if win is not None:
            lrows, lidx = self.rows[li]
            if win[1] is not None:
                n = min(win[1].shape[2], a)
                out[:, lidx, :n] = win[1][:, lrows, :n]
        else:
            for g in self.groups["sink"]:
                n = min(g.buf.n, a)
                if n and li in g.rows:
                    rows, idx = g.rows[li]
                    put(g, rows, idx, 0, n)
        rest_n = self._n("rest")
        if rest_n:
            lo = self.rest_end - rest_n
            for g in self.groups["rest"]:
                if li not in g.rows:
                    continue
                rows, idx = g.rows[li]
                if r.channel_group is None:
                    n = min(g.buf.n, a - lo)
                    if n > 0:
                        put(g, rows, idx, lo, n)
                    continue
                t = lo                                # channel groups all lie before the oldest query
                if g.partial is not None:
                    m = g.partial.shape[-2]
                    _write(out, idx, t, m, lambda d, g=g, rows=rows: g.fill_partial(d, rows))
                    t += m
                if g.buf.n:
                    put(g, rows, idx, t, g.tokens())
        if win is not None:
            n = min(0 if win[2] is None else win[2].shape[2], a - self.rest_end)
            if n > 0:
                out[:, lidx, self.rest_end:self.rest_end + n] = win[2][:, lrows, :n]
            return
        n = min(self.pending.n, a - self.rest_end)
        if n > 0:
            rows, idx = self.rows[li]
            out[:, idx, self.rest_end:self.rest_end + n] = self.pending.view(0, n)[0][:, rows]
        n = min(self._n("recent"), a - self.rest_end)
        if n > 0:
            for g in self.groups["recent"]:
                if li in g.rows:
                    rows, idx = g.rows[li]
                    put(g, rows, idx, self.rest_end, n)

    def error_bounds_into(self, e: torch.Tensor, li: int) -> None:
        """e (B, 2 Hkv, n) float64: layer li's decoded codes of positions [0, n) at its streams."""
        if li in self.rows:
            rows, idx = self.rows[li]
            e[:, idx] = norms.decode(self.codes.view(0, e.shape[-1])[0][:, rows])

    def nbytes(self, li: int | None = None) -> int:
        """Bytes held, all rows or layer li's (every row of a buffer holds the same bytes)."""
        def share(nb, rows, total_rows):
            if li is None:
                return nb
            if li not in rows:
                return 0
            s = rows[li][0]
            return nb // total_rows * (s.stop - s.start)

        total = share(self.pending.nbytes() + self.codes.nbytes(), self.rows, self.h)
        for gs in self.groups.values():
            for g in gs:
                nrows = sum(s.stop - s.start for s, _ in g.rows.values())
                total += share(g.buf.nbytes() + (g.partial.nbytes if g.partial is not None else 0), g.rows, nrows)
        return total

    def absorb(self, parts: list) -> None:
        """Fill this (empty) lane with the contents of ``parts``: lanes of single layers, in layer order, with
        the same layout key and chunk history, whose rows together are this lane's rows."""
        state = {(q.rest_end, q.recent_start, q.length, q.oldest) for q in parts}
        assert len(state) == 1, "the layers' first chunks differ"
        self.version += 1
        self.rest_end, self.recent_start, self.length, self.oldest = state.pop()

        def cat_bufs(dst: _Buf, srcs: list) -> None:
            srcs = [b for b in srcs if b.ts is not None and b.n]
            if srcs:
                dst.ts = tuple(None if srcs[0].ts[i] is None else torch.cat([b.view()[i] for b in srcs], dim=1)
                               for i in range(len(srcs[0].ts)))
                dst.lo, dst.hi = 0, srcs[0].n

        for seg, gs in self.groups.items():
            for g in gs:
                mine = [h for q in parts for h in q.groups[seg] if h.fmt.name == g.fmt.name]
                cat_bufs(g.buf, [h.buf for h in mine])
                ps = [h.partial for h in mine if h.partial is not None]
                if ps:
                    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=1)  # noqa: E731
                    g.partial = Packed(g.fmt, (ps[0].shape[0], sum(p.shape[1] for p in ps)) + tuple(ps[0].shape[2:]),
                                       cat([p.data for p in ps]), cat([p.scale for p in ps]), cat([p.zero for p in ps]))
        cat_bufs(self.pending, [q.pending for q in parts])
        cat_bufs(self.codes, [q.codes for q in parts])

    def reorder(self, idx: torch.Tensor) -> None:
        self.version += 1
        for gs in self.groups.values():
            for g in gs:
                g.buf.reorder(idx)
                if g.partial is not None:
                    p = g.partial
                    sel = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
                    g.partial = Packed(p.fmt, p.shape, sel(p.data), sel(p.scale), sel(p.zero))
        self.pending.reorder(idx)
        self.codes.reorder(idx)


@dataclass
class _Part:
    rows: torch.Tensor | None      # batch rows (None: all)
    pad: int                       # their left padding: cache position pad holds their position 0
    store: "_Store"


class _Store:
    """The storage of batch rows that share their positions (docs/design.md §4.2): the model's lanes, the
    layers' first chunks until they are merged, the staged chunks."""

    def __init__(self, rules_by_layer: list, error_norms: bool, row_limits: list):
        self.rules_by_layer, self.error_norms, self.row_limits = rules_by_layer, error_norms, row_limits
        self.count = torch.zeros(2, dtype=torch.int64)     # stored keys, values beyond the measured maxima
        self.reset()

    def _count(self, x: torch.Tensor, layers: list) -> None:
        """Count the vectors of x (B, rows, n, d) — the K then V streams of ``layers`` — beyond their limits."""
        if self._lim_layers != layers:
            self._lim, self._lim_layers = torch.cat([self.row_limits[li] for li in layers]).view(1, -1, 1), layers
        over = x.abs().amax(-1) > self._lim
        b, _, n = over.shape
        self.count += over.view(b, len(layers), 2, -1, n).sum(dim=(0, 1, 3, 4))

    @property
    def d(self) -> int:
        lanes = self.lanes or [q for qs in self.first.values() for q in qs]
        return lanes[0].d

    def read_into(self, out: torch.Tensor, a: int, li: int) -> None:
        for lane in self.lanes or []:
            lane.read_into(out, a, li)

    def error_bounds_into(self, e: torch.Tensor, li: int) -> None:
        for lane in self.lanes or []:
            lane.error_bounds_into(e, li)

    def nbytes(self, li: int | None = None) -> int:
        self.flush()
        return sum(lane.nbytes(li) for lane in self.lanes or [])

    def capacity_nbytes(self) -> int:
        """Bytes the buffers hold allocated, spare capacity included (what the process's memory sees)."""
        self.flush()
        total = 0
        for lane in self.lanes or []:
            bufs = [lane.pending, lane.codes] + [g.buf for gs in lane.groups.values() for g in gs]
            total += sum(b.capacity_nbytes() for b in bufs)
            total += sum(g.partial.nbytes for gs in lane.groups.values() for g in gs if g.partial is not None)
        return total

    def reset(self) -> None:
        self._lim_layers = None
        self.lanes: list | None = None          # built at the first store, from the layers that were updated
        self.first: dict = {}                   # layer -> its own lanes, holding its first chunk (until merged)
        self.active: list = []
        self.staged: list = [None] * len(self.rules_by_layer)   # per layer: its last chunk, (B, 2 Hkv, n, d)

    @property
    def appended(self) -> int:
        """Positions stored in the lanes (they all hold the same)."""
        return self.lanes[0].length if self.lanes else 0

    @property
    def laid(self) -> int | None:
        """The oldest query the lanes are laid out for."""
        return self.lanes[0].oldest if self.lanes else None

    def _lanes_for(self, active: list, d: int) -> list:
        per = 2 * len(self.rules_by_layer[active[0]])
        rules = []
        for li in active:
            ks = self.rules_by_layer[li]
            rules += [k for k, _ in ks] + [v for _, v in ks]
        by_layout: dict = {}
        for i, r in enumerate(rules):
            by_layout.setdefault((r.sink, r.recent, r.channel_group), []).append(i)
        return [_Lane(ids, [rules[i] for i in ids], d, per, active, self.error_norms) for ids in by_layout.values()]

    def merge_first(self) -> None:
        """The layers' first chunks, each stored in its layer's own lanes, become the model's lanes."""
        active = sorted(self.first)
        n = {q.length for qs in self.first.values() for q in qs}
        if len(n) != 1:
            raise InvalidArgument(f"the layers' first chunks differ in length ({sorted(n)}): a plan cache needs every "
                                  "layer updated with the same tokens")
        lanes = self._lanes_for(active, next(iter(self.first.values()))[0].d)
        for lane in lanes:
            lane.absorb([q for li in active for q in self.first[li] if q.key == lane.key])
        self.active, self.lanes, self.first = active, lanes, {}

    def stage(self, li: int, x: torch.Tensor, a: int) -> None:
        """Layer li's chunk [a, a + n). A layer's first chunk (the prefill) is stored at once in lanes of its own
        (merged into the model's at the next forward pass: no FP32 copy of a long prompt waits for the
        other layers); later chunks are staged: if li has one staged (a new forward pass began) every layer's
        is stored first, then the lanes are laid out for query a and the chunk waits."""
        if self.lanes is None and a == 0 and li not in self.first:
            self._count(x, [li])
            lanes = self._lanes_for([li], x.shape[-1])
            for lane in lanes:
                lane.relayout(0)
                lane.append(_take(x, lane.sel))
                lane.relayout(x.shape[2] - 1)
            self.first[li] = lanes
            return
        if self.staged[li] is not None or (self.lanes is None and self.first):
            self.flush()
        if a != self.appended:
            raise InvalidArgument(f"layer {li} was updated at position {a} while the cache holds {self.appended}: "
                                  "a plan cache needs every layer it holds updated once per forward pass")
        if self.lanes and self.laid != a:
            for lane in self.lanes:
                lane.relayout(a)
                lane.prepare_window()
        self.staged[li] = x

    def flush(self) -> None:
        """Store the staged chunks of every layer (one quantization per lane, segment and format)."""
        if self.lanes is None and self.first:
            self.merge_first()
        staged = [(li, x) for li, x in enumerate(self.staged) if x is not None]
        if not staged:
            return
        layers = [li for li, _ in staged]
        if layers != self.active:
            missing = sorted(set(self.active) - set(layers))
            raise InvalidArgument(f"layers {missing} were not updated in the last forward pass: a plan cache needs "
                                  "every layer it holds updated once per forward pass")
        n = {x.shape[2] for _, x in staged}
        if len(n) != 1:
            raise InvalidArgument(f"the layers' last chunks differ in length ({sorted(n)}): a plan cache needs every "
                                  "layer updated with the same tokens")
        x_all = staged[0][1] if len(staged) == 1 else torch.cat([x for _, x in staged], dim=1)
        self._count(x_all, layers)
        for lane in self.lanes:
            lane.append(_take(x_all, lane.sel))
        self.staged = [None] * len(self.staged)

    def crop(self, keep: int) -> None:
        self.flush()
        for lane in self.lanes or []:
            lane.crop(keep)

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        self.flush()
        for lane in self.lanes or []:
            lane.reorder(beam_idx)


class MixedPrecisionLayer(CacheLayerMixin):
    """One decoder layer's view of the cache. The storage is the cache's (its lanes hold every layer's
    streams, docs/design.md §4.2); a layer stages its chunk, which the cache stores with every other
    layer's at the start of the next forward pass, and reads its own rows.

    Each ``update`` is a chunk [a, b): the streams are first laid out for its oldest query a, then the
    chunk is appended; after the prefill (the first chunk) they are laid out for its last query.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, rules: list, owner: "MixedPrecisionCache", index: int = 0):
        super().__init__()
        self.rules = rules            # per KV head: (StreamRule for K, StreamRule for V)
        self.owner = owner
        self.index = index
        self.cumulative_length = 0
        self.exact_tail = 0           # positions the last update returned exact (its chunk; all of a prefill)
        self.batch = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != len(self.rules):
            raise InvalidArgument(f"the plan has {len(self.rules)} KV heads per layer, the model {key_states.shape[1]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (B, Hkv, n, d). Returns (B, Hkv, past + n, d)."""
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        n, h = key_states.shape[-2], key_states.shape[1]
        a = self.cumulative_length
        parts = self.owner._parts(kwargs.get("kwargs", kwargs).get("position_ids"), a, n)
        self.owner._admit(a + n - min(p.pad for p in parts))
        x = torch.cat([key_states, value_states], dim=1).float()
        self.batch = x.shape[0]
        for p in parts:
            xs = x if p.rows is None else x.index_select(0, p.rows)
            if a == 0 and p.pad:
                xs = xs[:, :, p.pad:]                # a left-padded row stores its own tokens only
            p.store.stage(self.index, xs, max(0, a - p.pad))
        self.cumulative_length += n
        self.exact_tail = n
        if first:
            return key_states, value_states
        out = self._read(x.shape[0], a, a + n, x.shape[3])
        out[:, :, a:] = x                        # the chunk's own K/V exact
        if out.dtype != key_states.dtype:
            out = out.to(key_states.dtype)
        return out[:, :h], out[:, h:]

    def _read(self, b: int, a: int, length: int, d: int) -> torch.Tensor:
        """(b, 2 Hkv, length, d) float32 with the stored values of positions [0, a) (a left-padded row's pads: 0)."""
        parts = self.owner.parts
        out = torch.empty(b, 2 * len(self.rules), length, d)
        if len(parts) == 1 and parts[0].rows is None:
            parts[0].store.read_into(out, a, self.index)
            return out
        for p in parts:
            m = a - p.pad
            part = torch.zeros(len(p.rows), out.shape[1], a, d)
            if m > 0:
                p.store.read_into(part[:, :, p.pad:], m, self.index)
            out[p.rows, :, :a] = part
        return out

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (B, Hkv, length, d) float32: every position as stored now (the chunk of the
        last update included, in its stored form), as the current layout reads them."""
        for p in self.owner.parts:
            p.store.flush()
        out = self._read(self.batch, self.cumulative_length, self.cumulative_length, self.owner.parts[0].store.d)
        h = len(self.rules)
        return out[:, :h], out[:, h:]

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise InvalidArgument(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(0, self.cumulative_length + tokens_to_remove)
        for p in self.owner.parts:
            p.store.crop(max(0, keep - p.pad))
        self.cumulative_length = keep

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.owner._reset_parts()
        self.cumulative_length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InvalidArgument("reorder a plan cache as a whole (MixedPrecisionCache.reorder_cache): its layers share "
                              "their storage")

    def nbytes(self) -> int:
        """Bytes of this layer's streams (the cache's lanes hold every layer's; counted row by row)."""
        return sum(p.store.nbytes(self.index) for p in self.owner.parts)

    def error_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dk, dv), each (B, Hkv, length) float64: upper bounds of ||K~_t - K_t||, ||V~_t - V_t|| for the K/V
        the last ``update`` returned (its chunk's own positions exact: 0), from the recorded codes alone."""
        if not self.owner.error_norms:
            raise InvalidArgument("this plan records no error norms (its rule has no error_norms): the cache "
                                  "cannot certify its attention at run time; plan without --no-error-norms")
        h = len(self.rules)
        e = torch.zeros(self.batch, 2 * h, self.cumulative_length, dtype=torch.float64)
        stored = self.cumulative_length - self.exact_tail
        for p in self.owner.parts:
            m = stored - p.pad
            if m <= 0:
                continue
            if p.rows is None:
                p.store.error_bounds_into(e[..., :m], self.index)
            else:
                part = torch.zeros(len(p.rows), 2 * h, m, dtype=torch.float64)
                p.store.error_bounds_into(part, self.index)
                e[p.rows, :, p.pad:stored] = part
        return e[:, :h], e[:, h:]


def _amax(stream) -> float:
    """The largest measured |x| over a stream's segments (the plan's amax upper ends)."""
    return max((float(st.amax) for st in stream.stats.values()), default=float("inf"))


ON_OVERFLOW = ("error", "warn")


class MixedPrecisionCache(Cache):
    """A plan's mixed-precision KV cache for ``model.generate`` (greedy, sampling, batch, beams,
    assisted decoding). Positions are those of each batch row's own sequence: a left-padded row stores its
    tokens from position 0, never its pads (docs/design.md §4).

    ``on_overflow``: what happens when a sequence grows past the plan's ``max_seq_len``, beyond which
    nothing is certified: ``"error"`` (default) raises InvalidArgument; ``"warn"`` warns once and sets
    ``certified`` to False.
    """

    def __init__(self, rules_by_layer: list, max_seq_len: int | None = None, on_overflow: str = "error",
                 error_norms: bool = False, limits: dict | None = None):
        if on_overflow not in ON_OVERFLOW:
            raise InvalidArgument(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
        self.max_seq_len, self.on_overflow, self.certified = max_seq_len, on_overflow, True
        self.error_norms = error_norms
        #: the plan's measured assumptions the cache watches (docs/design.md §4.1): (layer, KV head) ->
        #: {"q_max": float, "K": amax, "V": amax}; ``monitor`` counts what falls outside them
        self.limits = limits or {}
        super().__init__(layers=[MixedPrecisionLayer(r, self, i) for i, r in enumerate(rules_by_layer)])
        self.rules_by_layer = rules_by_layer
        # per layer, (2 Hkv,) the measured |x| maxima of its K then V streams (+inf where the plan has none):
        # the stores count the stored vectors beyond them, every layer at once
        self.row_limits = []
        for li, heads in enumerate(rules_by_layer):
            lim = [self.limits.get((li, h), {}).get(kv, float("inf")) for kv in ("K", "V") for h in range(len(heads))]
            self.row_limits.append(torch.tensor(lim, dtype=torch.float32))
        self._reset_parts()

    @property
    def monitor(self) -> dict:
        """Stored vectors with an entry beyond the plan's measured |x| maximum (any segment), keys and values
        (``queries_above_q_max`` is counted by ``hnfverify.kv.certify``, which sees the queries)."""
        counts = torch.zeros(2, dtype=torch.int64)
        for p in self.parts:
            p.store.flush()
            counts += p.store.count
        return {"queries_above_q_max": 0, "keys_above_amax": int(counts[0]), "values_above_amax": int(counts[1])}

    def _admit(self, length: int) -> None:
        if self.max_seq_len is None or length <= self.max_seq_len:
            return
        msg = (f"the sequence reaches {length} positions, past the plan's max_seq_len {self.max_seq_len}: the plan's "
               "bounds do not cover it")
        if self.on_overflow == "error":
            raise InvalidArgument(msg + " (use on_overflow='warn' to go on uncertified)")
        if self.certified:
            import warnings

            warnings.warn(msg + "; the output from here on is uncertified", UserWarning, stacklevel=3)
        self.certified = False

    @classmethod
    def from_plan(cls, plan: dict, model=None, on_overflow: str = "error") -> "MixedPrecisionCache":
        """The cache of a validated plan. ``model``: the model it will run in; the plan must have been
        made for it (weights, config, shape, tau: ``models.check_plan_matches_model``)."""
        from ..core.planview import view

        if model is not None:
            if not hasattr(model, "state_dict"):
                raise InvalidArgument("from_plan(plan, model) takes the model (to check its weights against the "
                                      f"plan's fingerprint), got a {type(model).__name__}")
            from ..models import check_plan_matches_model

            check_plan_matches_model(plan, model)
        pv = view(plan)
        for st in pv.streams():
            if st.blocks:
                raise InvalidArgument(f"layer {st.layer} head {st.head} {st.kv}: the cache cannot hold a plan's "
                                      "per-position blocks")
        rules = [[(h.keys.rule, h.values.rule) for h in layer.heads] for layer in pv.layers]
        limits = {(h.layer, h.head): {"q_max": float(h.q_max), "K": _amax(h.keys), "V": _amax(h.values)}
                  for h in pv.heads()}
        return cls(rules, pv.max_seq_len, on_overflow, error_norms=plan["rule"].get("error_norms") == "u8log",
                   limits=limits)

    def nbytes(self) -> int:
        """Bytes held by the packed cache: values, scales, zero-points, pending positions and recorded
        error norms (live entries; ``capacity_nbytes`` adds the buffers' spare room)."""
        return sum(p.store.nbytes() for p in self.parts)

    def capacity_nbytes(self) -> int:
        """Bytes the buffers hold allocated, spare capacity included (what the process's memory sees)."""
        return sum(p.store.capacity_nbytes() for p in self.parts)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search): every layer's storage at once. With padded rows, a row's new
        content must come from a row of the same padding (beams of one input do)."""
        if len(self.parts) == 1 and self.parts[0].rows is None:
            self.parts[0].store.reorder(beam_idx)
            return
        src = beam_idx.tolist()
        for p in self.parts:
            rows = p.rows.tolist()
            where = {r: i for i, r in enumerate(rows)}
            if any(src[r] not in where for r in rows):
                raise InvalidArgument("reorder_cache mixes rows of different left padding")
            p.store.reorder(torch.tensor([where[src[r]] for r in rows]))

    def reset(self) -> None:
        for layer in self.layers:
            layer.cumulative_length = 0
            layer.is_initialized = False
        self._reset_parts()

    # ---- batch rows and their positions (docs/design.md §4, §4.2)
    def _reset_parts(self) -> None:
        #: groups of batch rows that share their positions: one for an unpadded batch (rows None); with left
        #: padding, one per distinct pad, each row storing its own tokens at positions 0, 1, ...
        self.parts = [_Part(None, 0, _Store(self.rules_by_layer, self.error_norms, self.row_limits))]
        self._decided = False
        self._checked = None

    def _parts(self, position_ids, a: int, n: int) -> list:
        """The parts for a chunk [a, a + n) of the batch; the first chunk decides the padding from the model's
        position ids (pads: the ids of a row's real tokens count from 0 after them); later chunks must
        continue every row's positions."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != n:
            if self._decided and any(p.pad for p in self.parts):
                raise InvalidArgument("a left-padded batch needs the model's position ids at every step")
            self._decided = True
            return self.parts
        if position_ids is self._checked:             # the layers of one forward pass share the tensor
            return self.parts
        self._checked = position_ids
        pos = position_ids.detach().to("cpu", torch.long)
        if not self._decided:
            if a != 0:
                raise InvalidArgument(f"the first chunk a plan cache sees starts at position {a}, not 0")
            pads = (n - 1 - pos[:, -1]).tolist()
            for b, pad in enumerate(pads):
                if not 0 <= pad < n or not torch.equal(pos[b, pad:], torch.arange(n - pad)):
                    raise InvalidArgument(f"row {b}: position ids {pos[b].tolist()[:8]}... are not those of a "
                                          "sequence from position 0 after left padding")
            if any(pads):
                self.parts = [_Part(torch.tensor([b for b, q in enumerate(pads) if q == pad]), pad,
                                    _Store(self.rules_by_layer, self.error_norms, self.row_limits))
                              for pad in sorted(set(pads))]
            self._decided = True
            return self.parts
        for p in self.parts:
            rows = pos if p.rows is None else pos.index_select(0, p.rows)
            lo = p.pad if a == 0 else 0                  # the first chunk's pads carry any ids
            if not bool((rows[:, lo:] == torch.arange(a - p.pad + lo, a - p.pad + n)).all()):
                raise InvalidArgument(f"position ids {rows[0].tolist()[:8]} do not continue the cache's positions "
                                      f"(from {a - p.pad}): a plan cache stores one sequence per batch row")
        return self.parts
