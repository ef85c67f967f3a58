"""IEEE-style floating formats stored without a scale: FP32, FP16, BF16.

Round-to-nearest: |x - fl(x)| <= u |x| in the normal range and <= SUB (half the subnormal
spacing) below it, so ||dx||_2 <= u ||x||_2 + sqrt(d) SUB. Values beyond the largest finite
number overflow: the format is not representable for such a segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..numbers import fmt_number, sqrt_up
from .base import Format, SegmentStats


@dataclass(frozen=True)
class FloatFormat(Format):
    mantissa_bits: int = 0      # explicit fraction bits (p - 1)
    min_exp: int = 0            # exponent of the smallest normal number
    max_finite: Fraction = Fraction(0)

    @property
    def u(self) -> Fraction:
        return Fraction(1, 2 ** (self.mantissa_bits + 1))

    @property
    def sub_error(self) -> Fraction:
        """Half the spacing of subnormals: 2^(min_exp - mantissa_bits - 1)."""
        return Fraction(2) ** (self.min_exp - self.mantissa_bits - 1)

    @property
    def domain_max(self) -> Fraction:
        return self.max_finite

    def l2_error(self, s: SegmentStats) -> Fraction:
        return self.u * s.norm + sqrt_up(Fraction(s.d)) * self.sub_error

    def error_model(self) -> str:
        return (f"round-to-nearest; |dx| <= u|x| (normal), <= {fmt_number(self.sub_error)} (subnormal); "
                f"overflow above {fmt_number(self.max_finite)}")


def _fmax(mant: int, max_exp: int) -> Fraction:
    return (2 - Fraction(1, 2 ** mant)) * Fraction(2) ** max_exp


FP32 = FloatFormat("fp32", "float", "none", 0, 32, 0, mantissa_bits=23, min_exp=-126, max_finite=_fmax(23, 127))
FP16 = FloatFormat("fp16", "float", "none", 0, 16, 0, mantissa_bits=10, min_exp=-14, max_finite=Fraction(65504))
BF16 = FloatFormat("bf16", "float", "none", 0, 16, 0, mantissa_bits=7, min_exp=-126, max_finite=_fmax(7, 127))
