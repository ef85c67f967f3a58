"""Recorded error norms (docs/design.md §4.1): one byte per stored position and K|V stream, a code of an
upper bound of ||x~_t - x_t|| (x~_t: the float32 value the cache returns for position t).

Code c = 0: the stored value is exact; 1 <= c <= 254: the bound 2^((c - 180) / 8) (so from 2^-22.4 to
2^9.25, each step 9% above the last); c = 255: no finite bound recorded. ``encode_up`` picks the
smallest code whose decoded value is >= x, checked with the same ``decode`` every reader uses.
"""

from __future__ import annotations

import torch

OFFSET, STEP = 180, 8
INF_CODE = 255
#: relative margin on a float64 norm of a float32 difference (d << 10^3 terms: error below 10^-13)
NORM_MARGIN = 1e-12


def _table() -> torch.Tensor:
    t = torch.exp2((torch.arange(256, dtype=torch.float64) - OFFSET) / STEP)
    t[0], t[INF_CODE] = 0.0, float("inf")
    return t


#: the decoded value of every code, computed once: every reader (and ``encode_up``'s check) sees the same bits
TABLE = _table()


def decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float64 upper bounds (0 for code 0, +inf for code 255)."""
    return TABLE[codes.long()]


def encode_up(x: torch.Tensor) -> torch.Tensor:
    """float64 x >= 0 -> uint8 codes: the smallest code c with decode(c) >= x (0 for x = 0, 255 past the
    largest finite code and for nan), found by binary search in the decode table itself."""
    x = x.to(torch.float64).contiguous()
    c = torch.searchsorted(TABLE, torch.nan_to_num(x, nan=float("inf")))     # first c with TABLE[c] >= x
    return c.clamp_(max=INF_CODE).to(torch.uint8)


def error_norm(stored: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(..., n, d) float32 stored and exact values -> (..., n) float64 upper bounds of ||stored - exact||."""
    return (stored.double() - exact.double()).norm(dim=-1) * (1 + NORM_MARGIN)


def chained(codes: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Codes of a value re-quantized once more: ||x~~ - x|| <= ||x~ - x|| + ||x~~ - x~|| (triangle)."""
    return encode_up((decode(codes) + stage) * (1 + NORM_MARGIN))
