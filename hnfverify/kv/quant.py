"""Quantize / dequantize cached vectors exactly as the formats' reference semantics say
(``hnfverify/formats``), with real packed storage: INT4 two values per byte, INT2 four, INT8 one,
FP8 through torch's float8 dtypes, FP16/BF16/FP32 as such; scales and zero-points in FP16.

``quantize(x, fmt)`` takes x of shape (..., n, d) (n tokens of d channels) and returns a
:class:`Packed` whose ``nbytes`` counts every stored byte; ``dequantize`` gives float32 back.
Channel-grouped formats need n to be a multiple of the group (the cache keeps incomplete groups
in FP32, as the plan's accounting does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.formats import Format
from ..core.formats.floating import FloatFormat
from ..core.formats.fp8 import Fp8Format

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Packed:
    fmt: Format
    shape: tuple            # (..., n, d) of the original
    data: torch.Tensor      # packed values
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.zero):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest FP16 <= x (x float32)."""
    h = x.to(torch.float16)
    lower = torch.nextafter(h, torch.full_like(h, float("-inf")))
    return torch.where(h.to(torch.float32) > x, lower, h)


def _fp16_up_from64(x: torch.Tensor) -> torch.Tensor:
    """Smallest FP16 >= x (x float64)."""
    h = x.to(torch.float16)
    upper = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.to(torch.float64) < x, upper, h)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: uint8 values < 2^bits, last dim divisible by 8 // bits -> packed uint8."""
    if bits == 8:
        return q
    per = 8 // bits
    if q.shape[-1] % per:                       # a short channel group: pad to whole bytes
        q = torch.nn.functional.pad(q, (0, per - q.shape[-1] % per))
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def _unpack(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return p
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(p >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*p.shape[:-1], p.shape[-1] * per)[..., :n]


def _grouped(x: torch.Tensor, fmt: Format, group_tokens: int | None = None) -> torch.Tensor:
    """View (..., n, d) as (..., groups, group_size) along the format's grouping. ``group_tokens``:
    for a channel format, the tokens of one group when it is not the format's full group (the rest's
    first group, which starts at the sink boundary, docs/design.md §4); then n must equal it."""
    if fmt.granularity == "channel":
        n, d = x.shape[-2], x.shape[-1]
        g = fmt.group if group_tokens is None else group_tokens
        if group_tokens is not None and not 1 <= group_tokens <= fmt.group:
            raise ValueError(f"{fmt.name}: a group of {group_tokens} tokens exceeds the format's {fmt.group}")
        if n % g:
            raise ValueError(f"{fmt.name}: {n} tokens is not a multiple of the channel group {g}")
        # (..., n/g, g, d) -> (..., n/g, d, g): each row is one channel over g tokens
        return x.reshape(*x.shape[:-2], n // g, g, d).transpose(-1, -2)
    if fmt.group != x.shape[-1]:
        raise ValueError(f"{fmt.name}: per-token group {fmt.group} must equal head_dim {x.shape[-1]}")
    return x


def _ungrouped(y: torch.Tensor, fmt: Format, shape) -> torch.Tensor:
    if fmt.granularity == "channel":
        return y.transpose(-1, -2).reshape(shape)
    return y.reshape(shape)


def quantize(x: torch.Tensor, fmt: Format, group_tokens: int | None = None) -> Packed:
    """x: (..., n, d). ``group_tokens``: see :func:`_grouped` (channel formats only)."""
    x = x.detach().to(torch.float32)
    shape = tuple(x.shape)
    if isinstance(fmt, Fp8Format):
        dt = _FP8[fmt.name.rsplit("_", 1)[0]]
        g = _grouped(x, fmt)
        mx = float(fmt.max_finite)
        amax = g.abs().amax(dim=-1, keepdim=True).to(torch.float64)
        s = torch.clamp(_fp16_up_from64(amax / mx), min=2.0 ** -14)
        y = (g / s.to(torch.float32)).clamp(-mx, mx).to(dt)
        return Packed(fmt, shape, y, scale=s)
    if isinstance(fmt, FloatFormat):
        return Packed(fmt, shape, x.to(_FLOAT[fmt.name]))
    n_levels = 2 ** fmt.value_bits - 1
    g = _grouped(x, fmt, group_tokens)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    z = _fp16_down(lo)
    s = torch.clamp(_fp16_up_from64((hi.to(torch.float64) - z.to(torch.float64)) / n_levels), min=2.0 ** -24)
    q = torch.round((g - z.to(torch.float32)) / s.to(torch.float32)).clamp(0, n_levels).to(torch.uint8)
    return Packed(fmt, shape, _pack(q, fmt.value_bits), scale=s, zero=z)


def dequantize(p: Packed) -> torch.Tensor:
    fmt = p.fmt
    if isinstance(fmt, Fp8Format):
        y = p.data.to(torch.float32) * p.scale.to(torch.float32)
        return _ungrouped(y, fmt, p.shape)
    if isinstance(fmt, FloatFormat):
        return p.data.to(torch.float32)
    gshape_last = fmt.group if fmt.granularity != "channel" else p.shape[-2] // p.data.shape[-3]
    q = _unpack(p.data, fmt.value_bits, gshape_last).to(torch.float32)
    y = q * p.scale.to(torch.float32) + p.zero.to(torch.float32)
    return _ungrouped(y, fmt, p.shape)


def roundtrip(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    return dequantize(quantize(x, fmt))
