"""Quantize / dequantize cached vectors exactly as the formats' reference semantics say
(``hnfverify/core/formats``), with real packed storage: INT4 two values per byte, INT2 four, INT8 one,
FP8 through torch's float8 dtypes, FP16/BF16/FP32 as such; scales and zero-points in FP16.

``quantize(x, fmt)`` takes x of shape (..., n, d) (n tokens of d channels) and returns a
:class:`Packed` whose ``nbytes`` counts every stored byte; ``dequantize`` gives float32 back.
Channel-grouped formats need n to be a multiple of the group (the cache keeps incomplete groups
in FP32, as the plan's accounting does).
"""

from __future__ import annotations

import torch

from ..core.formats import Format
from .codecs import codec_for
from .storage import Packed, pack_bits, unpack_bits

__all__ = ["Packed", "dequantize", "pack_bits", "quantize", "roundtrip", "unpack_bits"]


def quantize(x: torch.Tensor, fmt: Format, group_tokens: int | None = None) -> Packed:
    """x: (..., n, d). ``group_tokens``: see :func:`hnfverify.kv.storage.grouped` (channel formats only)."""
    x = x.detach().to(torch.float32)
    return codec_for(fmt).quantize(x, fmt, tuple(x.shape), group_tokens)


def quantize_values(x: torch.Tensor, fmt: Format, group_tokens: int | None = None) -> tuple:
    """(quantize(x, fmt), the float32 values it stores): bit-identical to dequantize() of the first, computed
    before packing (the cache records error norms of what it stores without unpacking it again)."""
    x = x.detach().to(torch.float32)
    return codec_for(fmt).quantize(x, fmt, tuple(x.shape), group_tokens, values=True)


def dequantize(p: Packed) -> torch.Tensor:
    return codec_for(p.fmt).dequantize(p)


def dequantize_into(p: Packed, dst: torch.Tensor) -> None:
    """dequantize(p) written into dst (a float32 tensor or view of p.shape), bit for bit the same values."""
    codec_for(p.fmt).dequantize_into(p, dst)


def roundtrip(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    return dequantize(quantize(x, fmt))
