"""MixedPrecisionCache: a transformers ``Cache`` that stores exactly what a plan says.

Per layer, KV head and K|V (DESIGN 2.5): positions t < S in the sink format; the last R positions
before the newest token in the recent format (per token); older ones in the rest format,
re-quantized from their recent value when they leave the window — per token, or for a
channel-grouped rest format per complete group of G positions, the incomplete group kept as the
FP32 copy of its recent values until it completes. Storage is packed (``hnfverify.kv.quant``);
``nbytes()`` counts it all. Each ``update`` returns the dequantized past (float32) with the new
tokens' own K/V exact; the prefill returns its K/V exact, as transformers' QuantizedLayer does.

    cache = MixedPrecisionCache.from_plan(plan, model.config)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=200)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import InvalidArgument
from .quant import Packed, dequantize, quantize


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
    """The stored history of one (layer, KV head, K|V): (B, n, d) float inputs, packed storage."""

    def __init__(self, fmts: dict, s: int, r: int):
        self.fmts, self.s, self.r = fmts, s, r
        self.sink: list = []           # Packed chunks, positions [0, S)
        self.recent: Packed | None = None
        self.recent_start = 0          # position of the first recent token
        self.rest: list = []           # Packed chunks (token formats) or complete groups (channel)
        self.pending: torch.Tensor | None = None   # (B, n, d) FP32 copies waiting for a channel group
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        """x: (B, n, d) new tokens at positions length .. length + n - 1."""
        n = x.shape[-2]
        start = self.length
        n_sink = max(0, min(n, self.s - start))
        if n_sink:
            self.sink.append(quantize(x[:, :n_sink], self.fmts["sink"]))
        if n > n_sink:
            q = quantize(x[:, n_sink:], self.fmts["recent"])
            if self.recent is None:
                self.recent_start = start + n_sink
            self.recent = _cat_packed([self.recent, q])
        self.length += n
        self._evict(self.length - 1)

    def _evict(self, newest: int) -> None:
        """Move positions t with newest - t >= R out of the recent window into rest."""
        if self.recent is None:
            return
        cut = newest - self.r + 1                 # first position that stays
        n_out = min(max(0, cut - self.recent_start), self.recent.shape[-2])
        if n_out == 0:
            return
        leaving = dequantize(_slice_packed(self.recent, 0, n_out))
        self.recent = _slice_packed(self.recent, n_out, self.recent.shape[-2])
        self.recent_start += n_out
        f = self.fmts["rest"]
        if f.granularity != "channel":
            self._add_rest(quantize(leaving, f))
            return
        self.pending = leaving if self.pending is None else torch.cat([self.pending, leaving], dim=-2)
        g = f.group
        full = self.pending.shape[-2] // g * g
        if full:
            self._add_rest(quantize(self.pending[:, :full], f))
            self.pending = self.pending[:, full:]

    def _add_rest(self, p: Packed) -> None:
        """Append to rest as one packed tensor (a copy of packed bytes per eviction; one dequantization
        per step instead of one per chunk)."""
        self.rest = [_cat_packed(self.rest + [p])]

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
        if self.pending is not None:
            n += self.pending.numel() * 4
        return n

    def reorder(self, idx: torch.Tensor) -> None:
        self.sink = [_select(p, idx) for p in self.sink]
        self.rest = [_select(p, idx) for p in self.rest]
        self.recent = _select(self.recent, idx)
        if self.pending is not None:
            self.pending = self.pending.index_select(0, idx.to(self.pending.device))


class MixedPrecisionLayer(CacheLayerMixin):
    """One decoder layer's cache: a :class:`_Stream` per KV head for keys and for values."""

    is_sliding = False
    is_croppable = False

    def __init__(self, rules: list):
        super().__init__()
        self.rules = rules            # per KV head: hnfverify.evaluate.HeadRule
        self.k_streams: list = []
        self.v_streams: list = []
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != len(self.rules):
            raise InvalidArgument(f"the plan has {len(self.rules)} KV heads per layer, the model {key_states.shape[1]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_streams = [_Stream(r.k, r.s, r.r) for r in self.rules]
        self.v_streams = [_Stream(r.v, r.s, r.r) for r in self.rules]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (B, Hkv, n, d). Returns (B, Hkv, past + n, d)."""
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        for h in range(len(self.rules)):
            self.k_streams[h].append(key_states[:, h].float())
            self.v_streams[h].append(value_states[:, h].float())
        self.cumulative_length += n
        if first:
            return key_states, value_states
        keys = torch.stack([s.materialize() for s in self.k_streams], dim=1).to(key_states.dtype)
        values = torch.stack([s.materialize() for s in self.v_streams], dim=1).to(value_states.dtype)
        keys[..., -n:, :] = key_states           # the new tokens' own K/V exact
        values[..., -n:, :] = value_states
        return keys, values

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


class MixedPrecisionCache(Cache):
    """A plan's mixed-precision KV cache for ``model.generate`` (greedy, sampling, batch, beams)."""

    def __init__(self, rules_by_layer: list):
        super().__init__(layers=[MixedPrecisionLayer(r) for r in rules_by_layer])

    @classmethod
    def from_plan(cls, plan: dict, config=None) -> "MixedPrecisionCache":
        from ..evaluate import plan_rules

        rules = plan_rules(plan)
        n_l, n_h = plan["shape"]["layers"], plan["shape"]["kv_heads"]
        if config is not None:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            got = (text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
            if got != (n_l, n_h):
                raise InvalidArgument(f"the plan is for {n_l} layers x {n_h} KV heads, the model has "
                                      f"{got[0]} x {got[1]}")
        return cls([[rules[(li, h)] for h in range(n_h)] for li in range(n_l)])

    def nbytes(self) -> int:
        """Bytes held by the packed cache: values, scales, zero-points and FP32 pending groups."""
        return sum(layer.nbytes() for layer in self.layers)
