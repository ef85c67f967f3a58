"""The stream mechanics every codec shares: the packed storage (``Packed``, bit packing), FP16
scales rounded the safe way, and the grouping of (..., n, d) tensors by a format's granularity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.formats import Format


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


def fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest FP16 <= x (x float32)."""
    h = x.to(torch.float16)
    lower = torch.nextafter(h, torch.full_like(h, float("-inf")))
    return torch.where(h.to(torch.float32) > x, lower, h)


def fp16_up_from64(x: torch.Tensor) -> torch.Tensor:
    """Smallest FP16 >= x (x float64)."""
    h = x.to(torch.float16)
    upper = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.to(torch.float64) < x, upper, h)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: uint8 values < 2^bits along the last dim (n of them) -> packed uint8, ceil(n * bits / 8) per row.

    Planar: with w = ceil(n / per) bytes per row (per = 8 // bits values a byte), byte j holds values
    j, w + j, 2w + j, ... in its lowest bits first, so unpacking writes contiguous halves (quarters)
    instead of interleaving — the fast way on CPU. A short row (a short channel group) is zero-padded.
    3-bit codes: a 2-bit plane of the low bits, then a 1-bit plane of the high bits (8 codes in 3 bytes;
    ``packed_row_bytes`` in hnfverify/core/formats counts them)."""
    if bits == 8:
        return q
    if bits == 3:
        return torch.cat([pack_bits(q & 3, 2), pack_bits(q >> 2, 1)], dim=-1)
    per = 8 // bits
    if q.shape[-1] % per:                       # a short channel group: pad to whole bytes
        q = torch.nn.functional.pad(q, (0, per - q.shape[-1] % per))
    parts = q.chunk(per, dim=-1)
    out = parts[0].clone()
    for i in range(1, per):
        out |= parts[i] << (bits * i)
    return out


_MASKS = {b: torch.tensor((1 << b) - 1, dtype=torch.uint8) for b in (1, 2, 4)}
_SHIFTS = {b: [torch.tensor(b * i, dtype=torch.uint8) for i in range(8 // b)] for b in (1, 2, 4)}
#: the masks of _MASKS repeated over the 8 bytes of an int64 word (unpacking 8 bytes per operation)
_WORD_MASKS = {b: torch.tensor(int.from_bytes(bytes([(1 << b) - 1] * 8), "little"), dtype=torch.int64) for b in (1, 2, 4)}


def _word_view(p: torch.Tensor) -> torch.Tensor | None:
    """p (uint8) viewed as int64 words along its last dim, where its layout allows it (else None)."""
    if p.shape[-1] % 8 or p.stride(-1) != 1 or p.storage_offset() % 8 or any(s % 8 for s in p.stride()[:-1]):
        return None
    return p.view(torch.int64)


def unpack_bits(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (..., w) packed -> (..., n) uint8 values."""
    if bits == 8:
        return p
    if bits == 3:                               # the low two bits + 4 * the high bit
        w = -(-n // 4)
        return unpack_bits(p[..., :w], 2, n).add_(unpack_bits(p[..., w:], 1, n), alpha=4)
    per = 8 // bits
    words = _word_view(p)
    if words is not None:                       # the same parts, 8 bytes per operation (an arithmetic shift's sign
        mask = _WORD_MASKS[bits]                # bits land only in bits the mask clears)
        parts = [torch.bitwise_and(words, mask)] + [torch.bitwise_and(torch.bitwise_right_shift(words, bits * i), mask)
                                                    for i in range(1, per)]
        out = torch.cat(parts, dim=-1).view(torch.uint8)
        return out if out.shape[-1] == n else out[..., :n]
    mask, shifts = _MASKS[bits], _SHIFTS[bits]              # uint8 0-dim tensors: no scalar wrapped per call
    parts = [torch.bitwise_and(p, mask)] + [torch.bitwise_and(torch.bitwise_right_shift(p, shifts[i]), mask)
                                            for i in range(1, per - 1)] + [torch.bitwise_right_shift(p, shifts[per - 1])]
    out = torch.cat(parts, dim=-1)
    return out if out.shape[-1] == n else out[..., :n]


def grouped(x: torch.Tensor, fmt: Format, group_tokens: int | None = None) -> torch.Tensor:
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


def ungrouped(y: torch.Tensor, fmt: Format, shape) -> torch.Tensor:
    if fmt.granularity == "channel":
        return y.transpose(-1, -2).reshape(shape)
    return y.reshape(shape)
