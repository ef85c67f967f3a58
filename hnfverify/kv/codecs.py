"""One codec per format family, behind the stream mechanics of ``storage.py``: floats (a cast),
FP8 (per-token FP16 scale, torch's float8 dtypes), integers and codebooks (FP16 scale and zero-point,
bit-packed codes), and the Hadamard-rotated per-token formats (the integer codec on the rotated vectors).
Each does exactly what the format's reference semantics say (``hnfverify/core/formats``)."""

from __future__ import annotations

import functools

import torch

from ..core.formats import Format
from ..core.formats.floating import FloatFormat
from ..core.formats.fp8 import Fp8Format, ScaledFp8Format
from ..core.formats.ggml import KVALUES, GgmlFormat
from ..core.formats.integer import CodebookFormat
from ..core.formats.rotated import RotatedFormat
from .rotation import rotate
from .storage import Packed, fp16_down, fp16_up_from64, grouped, pack_bits, ungrouped, unpack_bits

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class FloatCodec:
    """fp32, fp16, bf16: stored as such."""

    @staticmethod
    def quantize(x: torch.Tensor, fmt: Format, shape: tuple, group_tokens: int | None, values: bool = False):
        p = Packed(fmt, shape, x.to(FLOAT_DTYPES[fmt.name]))
        return (p, p.data.to(torch.float32)) if values else p

    @staticmethod
    def dequantize(p: Packed) -> torch.Tensor:
        return p.data.to(torch.float32)

    @staticmethod
    def dequantize_into(p: Packed, dst: torch.Tensor) -> None:
        dst.copy_(p.data)


class Fp8Codec:
    """FP8 E4M3 / E5M2 with a per-token FP16 scale (rounded up, at least 2^-14)."""

    @staticmethod
    def quantize(x: torch.Tensor, fmt: Format, shape: tuple, group_tokens: int | None, values: bool = False):
        dt = FP8_DTYPES[fmt.name.rsplit("_", 1)[0]]
        g = grouped(x, fmt)
        mx = float(fmt.max_finite)
        amax = g.abs().amax(dim=-1, keepdim=True).to(torch.float64)
        s = torch.clamp(fp16_up_from64(amax / mx), min=2.0 ** -14)
        y = (g / s.to(torch.float32)).clamp(-mx, mx).to(dt)
        p = Packed(fmt, shape, y, scale=s)
        return (p, Fp8Codec.dequantize(p)) if values else p

    @staticmethod
    def dequantize(p: Packed) -> torch.Tensor:
        y = p.data.to(torch.float32) * p.scale.to(torch.float32)
        return ungrouped(y, p.fmt, p.shape)

    @staticmethod
    def dequantize_into(p: Packed, dst: torch.Tensor) -> None:
        dst.copy_(p.data)
        dst.mul_(p.scale.to(torch.float32))


_LEVELS: dict = {}


def _levels(fmt: Format) -> tuple | None:
    """A codebook format's (levels, midpoints) as float32 tensors (exact: multiples of 1/32, and of 1/64), else None."""
    if not isinstance(fmt, CodebookFormat):
        return None
    b = fmt.value_bits
    if b not in _LEVELS:
        lv = torch.tensor([float(v) for v in fmt.levels], dtype=torch.float32)
        _LEVELS[b] = (lv, (lv[1:] + lv[:-1]) / 2)
    return _LEVELS[b]


def code_values(q: torch.Tensor, fmt: Format) -> torch.Tensor:
    """What the codes stand for in units of the scale: q itself (uniform grids, uint8) or the codebook's levels
    (float32)."""
    lv = _levels(fmt)
    return q if lv is None else lv[0][q.to(torch.int64)]


class IntCodec:
    """INT8 / INT4 / INT3 / INT2 and the LM codebooks, asymmetric: FP16 zero-point rounded down, scale rounded
    up; packed codes. A uniform code q stands for q s + z, a codebook's for levels[q] s + z."""

    @staticmethod
    def quantize(x: torch.Tensor, fmt: Format, shape: tuple, group_tokens: int | None, values: bool = False):
        n_levels = 2 ** fmt.value_bits - 1
        g = grouped(x, fmt, group_tokens)
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        z = fp16_down(lo)
        s = torch.clamp(fp16_up_from64((hi.to(torch.float64) - z.to(torch.float64)) / n_levels), min=2.0 ** -24)
        z32, s32 = z.to(torch.float32), s.to(torch.float32)
        lv = _levels(fmt)
        if lv is None:
            q = torch.round((g - z32) / s32).clamp(0, n_levels).to(torch.uint8)
        else:                                   # the nearest level (a tie goes to the lower; both are within W)
            q = torch.bucketize(((g - z32) / s32).contiguous(), lv[1]).to(torch.uint8)
        p = Packed(fmt, shape, pack_bits(q, fmt.value_bits), scale=s, zero=z)
        if not values:
            return p
        return p, ungrouped(IntCodec.affine(q, s32, z32, fmt), fmt, shape)   # what dequantize(p) gives

    @staticmethod
    def affine(q: torch.Tensor, s32: torch.Tensor, z32: torch.Tensor, fmt: Format) -> torch.Tensor:
        """The stored value of code q: q * s + z (levels[q] * s + z) in float32 (the one formula every path uses)."""
        return code_values(q, fmt).to(torch.float32) * s32 + z32

    @staticmethod
    def dequantize(p: Packed) -> torch.Tensor:
        fmt = p.fmt
        gshape_last = fmt.group if fmt.granularity != "channel" else p.shape[-2] // p.data.shape[-3]
        q = unpack_bits(p.data, fmt.value_bits, gshape_last)
        return ungrouped(IntCodec.affine(q, p.scale.to(torch.float32), p.zero.to(torch.float32), fmt), fmt, p.shape)

    @staticmethod
    def token_major(p: Packed) -> torch.Tensor:
        """The codes of full channel groups re-packed token by token: (..., groups, d, packed g) ->
        (..., groups, g, packed d). The same codes and bytes (g * bits is whole bytes for a full group);
        reading them needs no transpose (:meth:`token_major_into`)."""
        g = p.fmt.group
        q = unpack_bits(p.data, p.fmt.value_bits, g).transpose(-1, -2).contiguous()
        return pack_bits(q, p.fmt.value_bits)

    @staticmethod
    def token_major_into(fmt: Format, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         dst: torch.Tensor) -> None:
        """dequantize() of full channel groups stored by :meth:`token_major`, into dst (..., groups * g, d):
        the same float32 values (q * s, then + z)."""
        d = dst.shape[-1]
        q = code_values(unpack_bits(data, fmt.value_bits, d), fmt)        # (..., groups, g, d)
        dst = dst.unflatten(-2, (data.shape[-3], fmt.group))
        torch.mul(q, scale.to(torch.float32).transpose(-1, -2), out=dst)
        dst.add_(zero.to(torch.float32).transpose(-1, -2))

    @staticmethod
    def dequantize_into(p: Packed, dst: torch.Tensor) -> None:
        """The same values as :meth:`dequantize` (q * s, then + z, in float32), written straight into dst."""
        fmt = p.fmt
        s32, z32 = p.scale.to(torch.float32), p.zero.to(torch.float32)
        if fmt.granularity == "channel":        # codes (..., groups, d, g) read transposed, dst written in order
            g = p.shape[-2] // p.data.shape[-3]
            q = code_values(unpack_bits(p.data, fmt.value_bits, g), fmt).transpose(-1, -2)
            dst = dst.unflatten(-2, (p.data.shape[-3], g))
            s32, z32 = s32.transpose(-1, -2).contiguous(), z32.transpose(-1, -2).contiguous()
        else:
            q = code_values(unpack_bits(p.data, fmt.value_bits, fmt.group), fmt)
        torch.mul(q, s32, out=dst)
        dst.add_(z32)


class RotatedCodec:
    """``intB_tG_h`` / ``lmB_tG_h``: the inner per-token format of y = R(x) (``rotation.rotate``), read back as
    R(w). The packed bytes are the inner format's; the Packed carries the rotated format."""

    @staticmethod
    def _inner(p: Packed) -> Packed:
        return Packed(p.fmt.inner, p.shape, p.data, p.scale, p.zero)

    @staticmethod
    def quantize(x: torch.Tensor, fmt: Format, shape: tuple, group_tokens: int | None, values: bool = False):
        r = IntCodec.quantize(rotate(x), fmt.inner, shape, group_tokens, values)
        p, w = r if values else (r, None)
        p = Packed(fmt, p.shape, p.data, p.scale, p.zero)
        return (p, rotate(w)) if values else p

    @staticmethod
    def dequantize(p: Packed) -> torch.Tensor:
        return rotate(IntCodec.dequantize(RotatedCodec._inner(p)))

    @staticmethod
    def dequantize_into(p: Packed, dst: torch.Tensor) -> None:
        IntCodec.dequantize_into(RotatedCodec._inner(p), dst)
        rotate(dst, out=dst)


#: ggml's kvalues_iq4nl
_IQ4NL = torch.tensor(KVALUES, dtype=torch.int8)


class GgmlCodec:
    """llama.cpp's q8_0 / q4_0 / q5_0 / q4_1 / q5_1 (``hnfverify/core/formats/ggml.py``), bit for bit what the
    ``gguf`` package's ``quantize_blocks`` computes (float32 throughout). Per token: ``data`` holds the codes of its
    d / 32 blocks — 8-bit codes as int8 bytes; 4- and 5-bit codes as ggml's nibble pairs (byte j of a block: code j
    | code j + 16 << 4), then for 5 bits each block's 32 high bits (4 bytes, little-endian) — ``scale`` the FP16 d
    and ``zero`` the FP16 min (``_1`` types) of each block. :func:`ggml_blocks` lays them out as ggml's blocks."""

    @staticmethod
    def codes(x: torch.Tensor, fmt) -> tuple:
        """x (..., nb, 32) float32 -> (codes uint8 (..., nb, 32), d float32 (..., nb, 1), min float32 or None)."""
        n = fmt.steps
        if fmt.name == "iq4_nl":
            return GgmlCodec.iq4_nl_codes(x) + (None,)
        if fmt.symmetric and n == 127:                                   # q8_0
            d = x.abs().amax(-1, keepdim=True) / 127
            idv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
            t = x * idv
            a = t.abs()
            fl = torch.floor(a)
            q = (torch.sign(t) * (fl + torch.floor(2 * (a - fl))))      # gguf's np_roundf: half away from zero
            q = torch.nan_to_num(q).clamp(-127, 127).to(torch.int8).view(torch.uint8)
            return q, d, None
        if fmt.symmetric:                                                # q4_0 / q5_0
            imax = x.abs().argmax(-1, keepdim=True)                      # the first of the largest |x|
            d = torch.gather(x, -1, imax) / -n
            idv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
            w = x * idv + (n + 0.5)
            q = torch.trunc(torch.nan_to_num(w).clamp(0, 255)).to(torch.uint8).clamp_(max=2 * n - 1)
            return q, d, None
        mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)     # q4_1 / q5_1
        d = (mx - mn) / n
        idv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        w = (x - mn) * idv + 0.5
        q = torch.trunc(torch.nan_to_num(w).clamp(0, 255)).to(torch.uint8).clamp_(max=n)
        return q, d, mn

    @staticmethod
    def iq4_nl_codes(x: torch.Tensor) -> tuple:
        """ggml's quantize_row_iq4_nl_ref (ntry = -1, no importance weights), operation by operation in float32: the
        codes nearest x / d0 at the trial scale d0 = M / -127, then d = sum w q x / sum w q^2 with w = x^2, the sums
        taken in order over the block's 32 elements as the C loop does; a block with amax < 1e-15 stores d = 0."""
        lv = _IQ4NL.to(torch.float32)
        amax = x.abs().amax(-1, keepdim=True)
        m = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))
        d0 = m / -127.0
        idv = 1.0 / d0
        al = idv * x
        mu = torch.searchsorted(lv, al.contiguous(), right=True).clamp_(1, 15)
        lower = (al - lv[mu - 1]) < (lv[mu] - al)
        q = torch.where(lower, mu - 1, mu)
        q = torch.where(al <= lv[0], 0, torch.where(al >= lv[15], 15, q))
        qv = lv[q]
        w = x * x
        sqx = torch.zeros(x.shape[:-1], dtype=torch.float32)
        sq2 = torch.zeros(x.shape[:-1], dtype=torch.float32)
        for j in range(x.shape[-1]):                                     # sequential float32 sums, as in C
            wq = w[..., j] * qv[..., j]
            sqx = sqx + wq * x[..., j]
            sq2 = sq2 + wq * qv[..., j]
        d = torch.where(sq2 > 0, sqx / torch.where(sq2 > 0, sq2, 1.0), 0.0).unsqueeze(-1)
        small = amax < 1e-15
        d = torch.where(small, 0.0, d)
        q = torch.where(small, 0, q)
        return torch.nan_to_num(q).to(torch.uint8), d

    @staticmethod
    def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
        """codes (..., nb, 32) -> (..., nb * bytes per block) in ggml's order within a block."""
        if bits == 8:
            return q.flatten(-2)
        lo = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)              # (..., nb, 16)
        if bits == 4:
            return lo.flatten(-2)
        hb = (q >> 4).to(torch.int64) << torch.arange(32)                # the high bits, bit j = code j's
        qh = hb.sum(-1, keepdim=True)                                    # (..., nb, 1) < 2^32
        qh = ((qh >> torch.tensor([0, 8, 16, 24])) & 255).to(torch.uint8)
        return torch.cat([lo.flatten(-2), qh.flatten(-2)], dim=-1)

    @staticmethod
    def _unpack(data: torch.Tensor, bits: int, nb: int) -> torch.Tensor:
        """Inverse of :meth:`_pack`: (..., bytes) -> codes (..., nb, 32) uint8 (int8 bytes for q8_0)."""
        if bits == 8:
            return data.unflatten(-1, (nb, 32))
        lo = data[..., :nb * 16].unflatten(-1, (nb, 16))
        q = torch.cat([lo & 15, lo >> 4], dim=-1)
        if bits == 5:
            qh = data[..., nb * 16:].unflatten(-1, (nb, 4)).to(torch.int64)
            word = (qh << torch.tensor([0, 8, 16, 24])).sum(-1, keepdim=True)
            q = q | (((word >> torch.arange(32)) & 1).to(torch.uint8) << 4)
        return q

    @staticmethod
    def quantize(x: torch.Tensor, fmt: Format, shape: tuple, group_tokens: int | None, values: bool = False):
        nb = shape[-1] // 32
        xb = x.reshape(*shape[:-1], nb, 32)
        q, d, mn = GgmlCodec.codes(xb, fmt)
        d16 = d.squeeze(-1).to(torch.float16)
        m16 = None if mn is None else mn.squeeze(-1).to(torch.float16)
        p = Packed(fmt, shape, GgmlCodec._pack(q, fmt.value_bits), scale=d16, zero=m16)
        return (p, GgmlCodec.dequantize(p)) if values else p

    @staticmethod
    def values(q: torch.Tensor, d16: torch.Tensor, m16, fmt) -> torch.Tensor:
        """The stored float32 values of codes q (..., nb, 32): d q (q8_0), d (q - n) (q4_0 / q5_0), d q + m (_1)."""
        d = d16.to(torch.float32).unsqueeze(-1)
        if fmt.name == "iq4_nl":
            return _IQ4NL.to(torch.float32)[q.long()] * d
        if fmt.symmetric and fmt.steps == 127:
            return q.view(torch.int8).to(torch.float32) * d
        if fmt.symmetric:
            return (q.to(torch.int8) - fmt.steps).to(torch.float32) * d
        return q.to(torch.float32) * d + m16.to(torch.float32).unsqueeze(-1)

    @staticmethod
    def dequantize(p: Packed) -> torch.Tensor:
        nb = p.shape[-1] // 32
        q = GgmlCodec._unpack(p.data, p.fmt.value_bits, nb)
        return GgmlCodec.values(q, p.scale, p.zero, p.fmt).reshape(p.shape)

    @staticmethod
    def dequantize_into(p: Packed, dst: torch.Tensor) -> None:
        dst.copy_(GgmlCodec.dequantize(Packed(p.fmt, tuple(dst.shape), p.data, p.scale, p.zero)))


def ggml_blocks(p: Packed):
    """The packed tokens as ggml's blocks, a numpy uint8 array (tokens * d / 32, bytes per block): FP16 d, then
    FP16 min (``_1``), then the high bits (5-bit types), then the nibbles (or int8 codes) — ``block_q*`` of ggml."""
    import numpy as np

    nb = p.shape[-1] // 32
    bits = p.fmt.value_bits
    data = p.data.reshape(-1, p.data.shape[-1])
    parts = [p.scale.reshape(-1, nb, 1).view(torch.uint8).reshape(-1, nb, 2)]
    if p.zero is not None:
        parts.append(p.zero.reshape(-1, nb, 1).view(torch.uint8).reshape(-1, nb, 2))
    if bits == 5:
        parts.append(data[:, nb * 16:].reshape(-1, nb, 4))
    parts.append(data[:, :nb * (32 if bits == 8 else 16)].reshape(-1, nb, 32 if bits == 8 else 16))
    return np.ascontiguousarray(torch.cat(parts, dim=-1).reshape(-1, sum(t.shape[-1] for t in parts)).numpy())


@functools.lru_cache(maxsize=None)
def _scale32(fmt) -> torch.Tensor:
    """A fixed-scale FP8 format's scale as a float32 0-dim tensor (exact: the name holds a float32 value)."""
    return torch.tensor(float(fmt.scale), dtype=torch.float32)


class ScaledFp8Codec:
    """vLLM's FP8-E4M3 with one fixed float32 scale (``fp8_e4m3_s<s>``): clamp(x / s, +-448) cast to e4m3, read as
    fp8 * s. Nothing but the FP8 bytes is stored per token (the scale is the plan's)."""

    @staticmethod
    def quantize(x: torch.Tensor, fmt: Format, shape: tuple, group_tokens: int | None, values: bool = False):
        s = _scale32(fmt)
        y = (x / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        p = Packed(fmt, shape, y)
        return (p, ScaledFp8Codec.dequantize(p)) if values else p

    @staticmethod
    def dequantize(p: Packed) -> torch.Tensor:
        return p.data.to(torch.float32) * _scale32(p.fmt)

    @staticmethod
    def dequantize_into(p: Packed, dst: torch.Tensor) -> None:
        dst.copy_(p.data)
        dst.mul_(_scale32(p.fmt))


def codec_for(fmt: Format):
    """The codec of a format's family (FP8 formats are float formats too: they are tested first)."""
    if isinstance(fmt, ScaledFp8Format):
        return ScaledFp8Codec
    if isinstance(fmt, GgmlFormat):
        return GgmlCodec
    if isinstance(fmt, RotatedFormat):
        return RotatedCodec
    if isinstance(fmt, Fp8Format):
        return Fp8Codec
    if isinstance(fmt, FloatFormat):
        return FloatCodec
    return IntCodec
