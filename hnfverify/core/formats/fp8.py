"""FP8 (E4M3, E5M2) with one FP16 scale per token group of ``group`` elements.

Reference semantics: s = max(fp16_round_up(amax_group / MAX), 2^-14) (the division in float64),
y = clamp(x / s, -MAX, MAX) in float32, q = fp8(y) round-to-nearest-even, dequantized q s in
float32. Lemma (``proofs/format_error_models.py``, z3: the cast for every float32 input, then the
pipeline with every float32 rounding modelled): |x - q s| <= (u + 2^-21) |x| + (1 + 2^-21) SUB s, with SUB
half the FP8 subnormal spacing and s <= max(amax (1 + 2^-10) / MAX, 2^-14) (+ a float64 ulp). So
||dx||_2 <= (u + 2^-21) ||x||_2 + sqrt(d) (1 + 2^-21) SUB max(amax (1 + 2^-9) / MAX, 2^-14).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..numbers import fmt_number, sqrt_up
from .base import SegmentStats
from .floating import FloatFormat

SCALE_BITS = 16


@dataclass(frozen=True)
class Fp8Format(FloatFormat):
    """The FP8 grid (``mantissa_bits``, ``min_exp``, ``max_finite`` as for FloatFormat) behind a scale."""

    @property
    def domain_max(self) -> Fraction:
        return Fraction(65504)      # the lemma's |x| <= 65504 (the FP16 scale stays finite)

    def l2_error(self, s: SegmentStats) -> Fraction:
        scale = max(s.amax * (1 + Fraction(1, 2 ** 9)) / self.max_finite, Fraction(1, 2 ** 14))
        return (self.u + Fraction(1, 2 ** 21)) * s.norm + \
            sqrt_up(Fraction(s.d)) * self.sub_error * (1 + Fraction(1, 2 ** 21)) * scale

    def error_model(self) -> str:
        return (f"per-token FP16 scale s >= amax/{fmt_number(self.max_finite)}, clamp, round-to-nearest-even; "
                f"|dx| <= (u + 2^-21)|x| + (1 + 2^-21) {fmt_number(self.sub_error)} s")


def e4m3(group: int) -> Fp8Format:
    return Fp8Format(f"fp8_e4m3_t{group}", "fp8", "token", group, 8, SCALE_BITS,
                     mantissa_bits=3, min_exp=-6, max_finite=Fraction(448))


def e5m2(group: int) -> Fp8Format:
    return Fp8Format(f"fp8_e5m2_t{group}", "fp8", "token", group, 8, SCALE_BITS,
                     mantissa_bits=2, min_exp=-14, max_finite=Fraction(57344))
