"""Asymmetric integer formats (INT8, INT4, INT3, INT2) with FP16 scale and zero-point per group.

Granularity ``token``: a group is the ``group`` channels of one cached vector (per-token, per-head).
Granularity ``channel``: a group is one channel over ``group`` consecutive tokens (KIVI-style keys).

Reference semantics (the cache must implement exactly this) for a group with range [lo, hi]:
z = fp16_round_down(lo); s = max(fp16_round_up((hi - z) / (2^b - 1)), 2^-24) (the division in
float64); q = clamp(round((x - z) / s), 0, 2^b - 1) and the dequantized q s + z, both in float32.
Lemma (``proofs/format_error_models.py``, z3, for b = 2, 3, 4, 8, every float32 rounding modelled):
with R = hi - lo, A = max(|lo|, |hi|), u = 1/(2 (2^b - 1)),

    |x - (q s + z)| <= u (1 + 2^-9) R + (u 2^-9 + 2^-20) A + 2^-23.

(The zero-point's rounding widens the range by up to 2^-10 A, hence the u 2^-9 A term; an earlier
model without it was refuted by z3.) Over a vector, R becomes the box diameter (D_token or
D_channel) and A becomes sqrt(d) amax.

Packing (``packed_row_bytes``, the bytes the cache really stores for one row of n codes): 8 // b codes
a byte for b = 1, 2, 4, 8; INT3 as a 2-bit plane and a 1-bit plane (8 codes in 3 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..numbers import sqrt_up
from .base import Format, SegmentStats

SCALE_BITS = 16
ZERO_BITS = 16
SLACK = Fraction(1, 2 ** 9)
A_COEF = Fraction(1, 2 ** 20)
ABS = Fraction(1, 2 ** 23)
INT_BITS = (8, 4, 3, 2)


def packed_row_bytes(bits: int, n: int) -> int:
    """Bytes of one packed row of n codes of ``bits`` bits (``hnfverify.kv.storage.pack_bits``)."""
    if bits == 3:                               # the low two bits and the high bit in planes of their own
        return packed_row_bytes(2, n) + packed_row_bytes(1, n)
    per = 8 // bits
    return -(-n // per)


@dataclass(frozen=True)
class IntFormat(Format):
    @property
    def u(self) -> Fraction:
        return Fraction(1, 2 * (2 ** self.value_bits - 1))

    def l2_error(self, s: SegmentStats) -> Fraction:
        diam = self.theorem_diameter(s)
        return self.u * (1 + SLACK) * diam + (self.u * SLACK + A_COEF) * s.norm + sqrt_up(Fraction(s.d)) * ABS

    def error_model(self) -> str:
        return "asymmetric round-to-nearest, " + _GROUP_BOUND


#: the scale, zero-point and bound every grouped integer format (uniform or codebook) shares
_GROUP_BOUND = ("FP16 zero-point (rounded down) and scale (rounded up) per group; "
                "|dx| <= u (1 + 2^-9) range + (u 2^-9 + 2^-20) |x|max + 2^-23")


def _grouped(cls, prefix: str, family: str, bits: int, granularity: str, group: int):
    tag = "t" if granularity == "token" else "c"
    return cls(f"{prefix}{bits}_{tag}{group}", family, granularity, group, bits, SCALE_BITS + ZERO_BITS)


def int_format(bits: int, granularity: str, group: int) -> IntFormat:
    return _grouped(IntFormat, "int", "int", bits, granularity, group)


#: Lloyd–Max levels for min–max-normalized Gaussian groups (docs/design.md §2.3b), in units of the scale
#: s = (hi - z) / (2^b - 1): a code q stands for LEVELS[b][q] * s + z. Fitted once by ``proofs/codebook_levels.py``
#: (Lloyd's algorithm on 5,000 groups of 64 N(0, 1) samples, levels free in [0, 2^b - 1]) and rounded to
#: multiples of 1/32, so every level and every midpoint is exact in float32.
LEVELS = {
    2: tuple(Fraction(n, 32) for n in (16, 39, 58, 80)),
    3: tuple(Fraction(n, 32) for n in (14, 50, 77, 101, 125, 149, 176, 211)),
    4: tuple(Fraction(n, 32) for n in (8, 54, 91, 123, 152, 179, 204, 229, 254, 279, 305, 331, 360, 391, 428, 473)),
}
CODEBOOK_BITS = (4, 3, 2)


def codebook_reach(levels: tuple) -> Fraction:
    """W: the farthest any t in [0, 2^b - 1] lies from its nearest level (in units of s): the larger of the
    two end gaps and half the widest inner gap."""
    top = len(levels) - 1
    inner = max(b - a for a, b in zip(levels, levels[1:]))
    return max(levels[0], top - levels[-1], inner / 2)


@dataclass(frozen=True)
class CodebookFormat(IntFormat):
    """The INT-b scale and zero-point with non-uniform levels: a code stands for LEVELS[b][q] s + z. The
    same lemma as INT-b with the rounding step's 1/2 replaced by the reach W (proofs/format_error_models.py),
    so u = W / (2^b - 1)."""

    @property
    def levels(self) -> tuple:
        return LEVELS[self.value_bits]

    @property
    def u(self) -> Fraction:
        return codebook_reach(self.levels) / (2 ** self.value_bits - 1)

    def error_model(self) -> str:
        return "asymmetric nearest of the Lloyd-Max levels, " + _GROUP_BOUND


def codebook_format(bits: int, granularity: str, group: int) -> CodebookFormat:
    return _grouped(CodebookFormat, "lm", "codebook", bits, granularity, group)
