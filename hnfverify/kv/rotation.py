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


def rotate(x: torch.Tensor) -> torch.Tensor:
    """H x for every row of x (..., d), float32: butterflies over the bits of the channel index, then the scale.
    A new contiguous tensor; its own inverse up to the rounding the formats' lemma bounds."""
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ModelError(f"a Hadamard rotation needs a power-of-two head_dim, got {d}")
    shape = x.shape
    a = x.to(torch.float32).reshape(-1, d).clone()
    b = torch.empty_like(a)
    h = 1
    while h < d:
        src, dst = a.view(-1, d // (2 * h), 2, h), b.view(-1, d // (2 * h), 2, h)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        a, b = b, a
        h *= 2
    a.mul_(torch.tensor(1.0 / math.sqrt(d), dtype=torch.float64).to(torch.float32).item())
    return a.view(shape)
