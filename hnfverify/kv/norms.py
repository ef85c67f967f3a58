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
    """float64 x >= 0 -> uint8 codes with decode(code) >= x."""
    x = x.to(torch.float64)
    pos = x > 0
    c = torch.ceil(STEP * torch.log2(torch.where(pos, x, torch.ones_like(x))) + OFFSET)
    c = torch.clamp(c, 1, INF_CODE)
    c = torch.where(pos, c, torch.zeros_like(c)).to(torch.uint8)
    # the float log2 may land one code low: step up wherever the decoded value falls short
    for _ in range(2):
        short = (decode(c) < x) & (c < INF_CODE)
        c = torch.where(short, c + 1, c)
    return torch.where(torch.isnan(x) | (x > TABLE[254]), torch.full_like(c, INF_CODE), c)


def error_norm(stored: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(..., n, d) float32 stored and exact values -> (..., n) float64 upper bounds of ||stored - exact||."""
    return (stored.double() - exact.double()).norm(dim=-1) * (1 + NORM_MARGIN)


def chained(codes: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Codes of a value re-quantized once more: ||x~~ - x|| <= ||x~ - x|| + ||x~~ - x~|| (triangle)."""
    return encode_up((decode(codes) + stage) * (1 + NORM_MARGIN))
