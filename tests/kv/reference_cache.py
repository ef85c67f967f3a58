"""The cache as it was before the fast layout (issue "decode at the speed of the full cache"): one
``_Stream`` per (layer, KV head, K|V), each segment its own packed tensors, re-concatenated every step.
Slow, but a separately written reading of docs/design.md §4: the tests drive it and the fast
``hnfverify.kv.cache.MixedPrecisionCache`` side by side and require bit-identical returns, codes and bytes.

Its original docstring: MixedPrecisionCache: a transformers ``Cache`` that stores exactly what a plan says.

Per layer, KV head and K|V the stream is laid out as docs/design.md §4 defines (``hnfverify.core.semantics``,
the definition the checker's obligations cover): positions t < S in the sink format; the recent
window in the recent format; older positions re-quantized from their recent value into the rest
format when they leave the window relative to the oldest query of a chunk — per token, or per
complete channel group (aligned at multiples of G, as the analysis groups them), the incomplete
group kept as the FP32 copy of its recent values. With R = 0 positions go straight to the rest.
Storage is packed (``hnfverify.kv.quant``); ``nbytes()`` counts it all. Each ``update`` returns the
dequantized past (float32) with the chunk's own K/V exact; the prefill returns its K/V exact.
With the plan's ``error_norms`` each stream also records, per position, a one-byte upper bound of its
stored value's error norm (``hnfverify.kv.norms``, docs/design.md §4.1), counted in ``nbytes()``;
``hnfverify.kv.certify`` turns them into a certified attention-error bound at every step.

    cache = MixedPrecisionCache.from_plan(plan, model)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=200)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hnfverify.errors import InvalidArgument
from hnfverify.core.semantics import StreamRule, channel_groups, layout
from hnfverify.kv import norms
from hnfverify.kv.cache import MixedPrecisionCache as _Fast
from hnfverify.kv.quant import Packed, dequantize, quantize


def _cat_packed(parts: list) -> Packed | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    f = parts[0].fmt
    shape = list(parts[0].shape)
    shape[-2] = sum(p.shape[-2] for p in parts)
    dim = -3 if f.granularity == "channel" else -2      # channel data: (..., groups, d, packed group)
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=dim)  # noqa: E731
    return Packed(f, tuple(shape), cat([p.data for p in parts]), cat([p.scale for p in parts]),
                  cat([p.zero for p in parts]))


def _slice_packed(p: Packed | None, a: int, b: int) -> Packed | None:
    """Token slice [a, b) of a per-token packed tensor (token and float formats only)."""
    if p is None or b <= a:
        return None
    shape = list(p.shape)
    shape[-2] = b - a
    sl = lambda t: None if t is None else t[..., a:b, :]  # noqa: E731
    return Packed(p.fmt, tuple(shape), sl(p.data), sl(p.scale), sl(p.zero))


def _select(p: Packed | None, idx: torch.Tensor) -> Packed | None:
    if p is None:
        return None
    sel = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
    return Packed(p.fmt, p.shape, sel(p.data), sel(p.scale), sel(p.zero))


class _Stream:
    """One (layer, KV head, K|V), stored as docs/design.md §4 lays it out (``hnfverify.core.semantics``).

    Storage, in position order, all (B, n, d): ``sink`` packed chunks [0, S); ``rest`` packed (one
    per-token tensor, or one entry per channel group) [S, rest_end); ``pending`` FP32 [rest_end,
    recent_start) (recent values whose channel group is incomplete, counted in ``nbytes`` as the recent-format
    codes the cache keeps of them; exact values when R = 0);
    ``recent`` packed [recent_start, length). ``oldest`` is the query the layout was made for.
    ``codes`` (B, length) uint8:
    the recorded error norms in position order (None when the plan records none).
    """

    def __init__(self, rule: StreamRule, record: bool = False):
        self.rule = rule
        self.record = record
        self.codes: torch.Tensor | None = None
        self.sink: list = []
        self.rest: list = []
        self.rest_end = 0
        self.pending: torch.Tensor | None = None
        self.recent: Packed | None = None
        self.recent_start = 0
        self.length = 0
        self.oldest = 0

    # ---- writing
    def append(self, x: torch.Tensor) -> None:
        """x: (B, n, d), positions length .. length + n - 1 (a chunk; its queries read it exactly)."""
        n, start, r = x.shape[-2], self.length, self.rule
        n_sink = max(0, min(n, r.sink - start))
        codes = []
        if n_sink:
            p = quantize(x[:, :n_sink], r.formats["sink"])
            self.sink.append(p)
            codes.append(self._codes_of(p, x[:, :n_sink]))
        tail = x[:, n_sink:]
        if tail.shape[-2]:
            if self.recent is None and self.pending is None and not self.rest:
                self.rest_end = self.recent_start = start + n_sink
            if r.recent > 0:
                p = quantize(tail, r.formats["recent"])
                self.recent = _cat_packed([self.recent, p])
                codes.append(self._codes_of(p, tail))
            elif r.channel_group is None:          # R = 0: straight to the per-token rest format
                p = quantize(tail, r.formats["rest"])
                self._add_rest(p)
                self.rest_end = self.recent_start = start + n
                codes.append(self._codes_of(p, tail))
            else:                                  # R = 0: exact until the channel group is complete
                self.pending = tail.clone() if self.pending is None else torch.cat([self.pending, tail], dim=-2)
                self.recent_start = start + n
                codes.append(self._codes_of(None, tail))
        if self.record:
            self.codes = torch.cat(([self.codes] if self.codes is not None else []) + codes, dim=-1)
        self.length += n

    def _codes_of(self, p: Packed | None, x: torch.Tensor) -> torch.Tensor | None:
        """Codes of the error norms of x stored as p (None: kept exact)."""
        if not self.record:
            return None
        if p is None:
            return torch.zeros(x.shape[:-1], dtype=torch.uint8)
        return norms.encode_up(norms.error_norm(dequantize(p), x))

    def _requantized(self, p: Packed, before: torch.Tensor, lo: int) -> None:
        """Positions lo.. (as many as ``before`` holds) re-stored as p from their stored values ``before``."""
        if self.record:
            n = before.shape[-2]
            stage = norms.error_norm(dequantize(p), before)
            self.codes[:, lo:lo + n] = norms.chained(self.codes[:, lo:lo + n], stage)

    def relayout(self, oldest: int) -> None:
        """Lay the stream out for queries >= ``oldest`` (docs/design.md §4): positions with
        oldest - t >= R leave the recent window; complete channel groups are quantized to the rest."""
        lay = layout(self.rule, oldest)
        self.oldest = oldest
        if self.length <= self.rule.sink:
            return
        r = self.rule
        n_out = lay.recent_start - self.recent_start
        if r.recent > 0 and n_out > 0 and self.recent is not None:
            leaving = dequantize(_slice_packed(self.recent, 0, n_out))
            self.recent = _slice_packed(self.recent, n_out, self.recent.shape[-2])
            self.recent_start += n_out
            self.pending = leaving if self.pending is None else torch.cat([self.pending, leaving], dim=-2)
        if self.pending is None or lay.rest_end <= self.rest_end:
            return
        f = r.formats["rest"]
        if r.channel_group is None:
            p = quantize(self.pending, f)
            self._add_rest(p)
            self._requantized(p, self.pending, self.rest_end)
            self.rest_end += self.pending.shape[-2]
            self.pending = None
            return
        for size in channel_groups(r, self.rest_end, lay.rest_end):
            p = quantize(self.pending[:, :size], f, group_tokens=size)
            self.rest.append(p)
            self._requantized(p, self.pending[:, :size], self.rest_end)
            self.pending = self.pending[:, size:]
            self.rest_end += size
        if self.pending.shape[-2] == 0:
            self.pending = None

    def _add_rest(self, p: Packed) -> None:
        """Per-token rest formats: one packed tensor (one dequantization per step)."""
        self.rest = [_cat_packed(self.rest + [p])]

    def crop(self, keep: int) -> None:
        """Drop positions >= keep: allowed while they are all still recent (or, with R = 0, pending or in
        a per-token rest), i.e. keep >= the query the layout was made for (docs/design.md §4)."""
        if keep >= self.length:
            return
        if keep < self.oldest:
            raise InvalidArgument(f"crop to {keep} positions: positions from {self.oldest - self.rule.recent} on "
                                  f"already left the recent window for a query at {self.oldest}; a plan cache can only "
                                  f"crop back to position {self.oldest} or later")
        r = self.rule
        if keep < r.sink:
            total, kept = 0, []
            for p in self.sink:
                n = p.shape[-2]
                if total + n <= keep:
                    kept.append(p)
                elif total < keep:
                    kept.append(_slice_packed(p, 0, keep - total))
                total += n
            self.sink = kept
        if r.recent > 0:
            if self.recent is not None:
                n = keep - self.recent_start
                self.recent = _slice_packed(self.recent, 0, n) if n > 0 else None
        elif r.channel_group is not None:           # R = 0: the chunk's positions are pending, exact
            if self.pending is not None:
                n = keep - self.rest_end
                self.pending = self.pending[:, :n] if n > 0 else None
            self.recent_start = max(keep, self.rest_end)
        else:                                       # R = 0, per-token rest: stored one by one from S on
            n = keep - r.sink
            self.rest = [_slice_packed(self.rest[0], 0, n)] if self.rest and n > 0 else []
            self.rest_end = self.recent_start = max(keep, r.sink)
        if self.codes is not None:
            self.codes = self.codes[:, :keep]
        self.length = keep

    # ---- reading
    def materialize(self) -> torch.Tensor:
        """(B, length, d) float32 in position order: sink, rest, pending, recent."""
        parts = [dequantize(p) for p in self.sink] + [dequantize(p) for p in self.rest]
        if self.pending is not None and self.pending.shape[-2]:
            parts.append(self.pending)
        if self.recent is not None:
            parts.append(dequantize(self.recent))
        return torch.cat(parts, dim=-2)

    def nbytes(self) -> int:
        n = sum(p.nbytes for p in self.sink) + sum(p.nbytes for p in self.rest)
        if self.recent is not None:
            n += self.recent.nbytes
        if self.pending is not None:                # R > 0: recent values, held as their recent-format codes
            n += quantize(self.pending, self.rule.formats["recent"]).nbytes if self.rule.recent > 0 else \
                self.pending.numel() * 4
        if self.codes is not None:
            n += self.codes.numel()
        return n

    def error_bounds(self) -> torch.Tensor:
        """(B, length) float64: upper bounds of ||x~_t - x_t|| as recorded (docs/design.md §4.1)."""
        return norms.decode(self.codes)

    def reorder(self, idx: torch.Tensor) -> None:
        self.sink = [_select(p, idx) for p in self.sink]
        self.rest = [_select(p, idx) for p in self.rest]
        self.recent = _select(self.recent, idx)
        if self.pending is not None:
            self.pending = self.pending.index_select(0, idx.to(self.pending.device))
        if self.codes is not None:
            self.codes = self.codes.index_select(0, idx.to(self.codes.device))


class MixedPrecisionLayer(CacheLayerMixin):
    """One decoder layer's cache: a :class:`_Stream` per KV head for keys and for values.

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
        self.k_streams: list = []
        self.v_streams: list = []
        self.cumulative_length = 0
        self.exact_tail = 0           # positions the last update returned exact (its chunk; all of a prefill)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != len(self.rules):
            raise InvalidArgument(f"the plan has {len(self.rules)} KV heads per layer, the model {key_states.shape[1]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        rec = self.owner.error_norms
        self.k_streams = [_Stream(k, rec) for k, _ in self.rules]
        self.v_streams = [_Stream(v, rec) for _, v in self.rules]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (B, Hkv, n, d). Returns (B, Hkv, past + n, d)."""
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        a = self.cumulative_length
        self.owner._admit(a + n)
        _refuse_padding(kwargs.get("kwargs", kwargs).get("position_ids"), a, n)
        streams = self.k_streams + self.v_streams
        for s in streams:
            s.relayout(a)
        for h in range(len(self.rules)):
            self.k_streams[h].append(key_states[:, h].float())
            self.v_streams[h].append(value_states[:, h].float())
        self.owner._monitor_stored(self.index, key_states, value_states)
        self.cumulative_length += n
        if first:
            for s in streams:
                s.relayout(a + n - 1)
            self.exact_tail = self.cumulative_length
            return key_states, value_states
        self.exact_tail = n
        keys = torch.stack([s.materialize() for s in self.k_streams], dim=1).to(key_states.dtype)
        values = torch.stack([s.materialize() for s in self.v_streams], dim=1).to(value_states.dtype)
        keys[..., -n:, :] = key_states           # the chunk's own K/V exact
        values[..., -n:, :] = value_states
        return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise InvalidArgument(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(0, self.cumulative_length + tokens_to_remove)
        for s in self.k_streams + self.v_streams:
            s.crop(keep)
        self.cumulative_length = keep

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.k_streams, self.v_streams = [], []
        self.cumulative_length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for s in self.k_streams + self.v_streams:
            s.reorder(beam_idx)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.k_streams + self.v_streams)

    def error_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dk, dv), each (B, Hkv, length) float64: upper bounds of ||K~_t - K_t||, ||V~_t - V_t|| for the K/V
        the last ``update`` returned (its chunk's own positions exact: 0), from the recorded codes alone."""
        if not self.owner.error_norms:
            raise InvalidArgument("this plan records no error norms (its rule has no error_norms): the cache "
                                  "cannot certify its attention at run time; plan without --no-error-norms")
        out = []
        for streams in (self.k_streams, self.v_streams):
            e = torch.stack([s.error_bounds() for s in streams], dim=1)
            if self.exact_tail:
                e[..., -self.exact_tail:] = 0.0
            out.append(e)
        return out[0], out[1]


def _refuse_padding(position_ids, past: int, n: int) -> None:
    """A plan's positions are those of one unpadded sequence (docs/design.md §4): with left padding the
    sink would hold pads and a sequence's first tokens would land in the rest. Refuse such batches."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != n:
        return
    want = torch.arange(past, past + n, device=position_ids.device)
    if not bool((position_ids == want).all()):
        raise InvalidArgument("a padded batch (position ids differ from the cache positions): plan positions are those "
                              "of unpadded sequences, so the sink would hold pads; run sequences of equal length or "
                              "one at a time")


ON_OVERFLOW = ("error", "warn")


class MixedPrecisionCache(Cache):
    """A plan's mixed-precision KV cache for ``model.generate`` (greedy, sampling, batch, beams,
    assisted decoding). Positions are those of unpadded sequences (docs/design.md §4).

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
        self.monitor = {"queries_above_q_max": 0, "keys_above_amax": 0, "values_above_amax": 0}
        super().__init__(layers=[MixedPrecisionLayer(r, self, i) for i, r in enumerate(rules_by_layer)])
        # per layer, (Hkv,) tensors of the measured amax of K and V: one comparison per update
        self._amax = {}
        for (li, h), lim in self.limits.items():
            self._amax.setdefault(li, {"K": [], "V": []})
            self._amax[li]["K"].append(lim["K"])
            self._amax[li]["V"].append(lim["V"])
        self._amax = {li: {kv: torch.tensor(x, dtype=torch.float32) for kv, x in d.items()}
                      for li, d in self._amax.items()}

    def _monitor_stored(self, li: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Count stored vectors with an entry beyond the plan's measured |x| maximum (any segment)."""
        lim = self._amax.get(li)
        if lim is None:
            return
        self.monitor["keys_above_amax"] += int((k.abs().amax(-1).float() > lim["K"].view(1, -1, 1)).sum())
        self.monitor["values_above_amax"] += int((v.abs().amax(-1).float() > lim["V"].view(1, -1, 1)).sum())

    # reading the plan and refusing overflows is not what this reference checks: the same code as the fast cache
    _admit = _Fast._admit
    from_plan = classmethod(_Fast.from_plan.__func__)

    def nbytes(self) -> int:
        """Bytes held by the packed cache: values, scales, zero-points and FP32 pending groups."""
        return sum(layer.nbytes() for layer in self.layers)
