"""The normalized Sylvester Hadamard rotation H of a power-of-two head_dim, of the ``_h`` formats
(docs/design.md §2.3c). H is symmetric and orthogonal, so a row x of (..., d) rotates as x H and back the same way.

The cache's H is the fast Walsh–Hadamard transform in float32: log2(d) butterfly stages (a + b, a - b) and one
multiplication by fl32(1/sqrt(d)) (exact for d = 4^k). Every operation is an elementwise IEEE operation, so
the result is bit-for-bit the same on any shape, batch and device (a matrix product's summation order is not),
and the stored values a step reads are exactly those whose error the cache recorded."""

from __future__ import annotations

import math

import torch

from ..core.formats import is_power_of_two
from ..errors import ModelError


def sylvester(d: int) -> torch.Tensor:
    """The +-1 Sylvester matrix of order d (a power of two), float64: S = [[S', S'], [S', -S']]."""
    if not is_power_of_two(d):
        raise ModelError(f"a Hadamard rotation needs a power-of-two head_dim, got {d}")
    s = torch.ones(1, 1, dtype=torch.float64)
    while s.shape[0] < d:
        s = torch.cat([torch.cat([s, s], 1), torch.cat([s, -s], 1)], 0)
    return s


def hadamard64(d: int) -> torch.Tensor:
    """S / sqrt(d) in float64 (the analysis' rotated ranges)."""
    return sylvester(d) / math.sqrt(d)


def rotate(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """H x for every row of x (..., d), float32: butterflies over the bits of the channel index, then the scale.
    Into ``out`` (any float32 tensor or view of x's shape, x itself included: only the last stage writes it, after
    every read of x) or a new tensor; its own inverse up to the rounding the formats' lemma bounds. The same
    operations in the same order either way."""
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ModelError(f"a Hadamard rotation needs a power-of-two head_dim, got {d}")
    shape = x.shape
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    if d == 1:
        return out.copy_(x)
    if d == 2 and out.data_ptr() == x.data_ptr():      # one stage: it would read what it writes
        x = x.clone()
    src = x.to(torch.float32)
    if src.stride(-1) != 1:
        src = src.contiguous()
    bufs = [torch.empty(shape, dtype=torch.float32, device=x.device) for _ in range(2 if d > 4 else 1)]
    h, k = 1, 0
    while h < d:
        last = 2 * h == d
        dst = out if last else bufs[k % len(bufs)]
        # (..., d / 2h, 2, h) views: the last dimension has stride 1, so out may be any slice of a larger tensor
        dv, sv = (t.view(*shape[:-1], d // (2 * h), 2, h) for t in (dst, src))
        torch.add(sv[..., 0, :], sv[..., 1, :], out=dv[..., 0, :])
        torch.sub(sv[..., 0, :], sv[..., 1, :], out=dv[..., 1, :])
        src, h, k = dst, 2 * h, k + 1
    out.mul_(torch.tensor(1.0 / math.sqrt(d), dtype=torch.float64).to(torch.float32).item())
    return out
