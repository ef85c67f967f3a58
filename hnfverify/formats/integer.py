"""Asymmetric integer formats (INT8, INT4, INT2) with FP16 scale and zero-point per group.

Granularity ``token``: a group is the ``group`` channels of one cached vector (per-token, per-head).
Granularity ``channel``: a group is one channel over ``group`` consecutive tokens (KIVI-style keys).

Quantize a group with range [lo, hi]: z = fp16_round_down(lo), s = fp16_round_up((hi - z)/(2^b - 1))
(at least 2^-24), q = clamp(round((x - z)/s), 0, 2^b - 1), dequantize q s + z. Then
|x - (q s + z)| <= s/2 + float32 evaluation error, and with R = hi - lo, A = max |x|:
s <= (R + 2^-11 A + 2^-24)(1 + 2^-10)/(2^b - 1). Per element, conservatively,
|dx| <= u (1 + 2^-10) R + 2^-20 A + 2^-24 with u = 1/(2 (2^b - 1)); the l2 bound over a vector
replaces R by the box diameter (D_token or D_channel) and A by sqrt(d) amax.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..numbers import sqrt_up
from .base import Format, SegmentStats

SCALE_BITS = 16
ZERO_BITS = 16
SLACK = Fraction(1, 2 ** 10)
A_COEF = Fraction(1, 2 ** 20)
ABS = Fraction(1, 2 ** 24)


@dataclass(frozen=True)
class IntFormat(Format):
    @property
    def u(self) -> Fraction:
        return Fraction(1, 2 * (2 ** self.value_bits - 1))

    def l2_error(self, s: SegmentStats) -> Fraction:
        diam = self.theorem_diameter(s)
        return self.u * (1 + SLACK) * diam + A_COEF * s.norm + sqrt_up(Fraction(s.d)) * ABS

    def error_model(self) -> str:
        return ("asymmetric round-to-nearest, FP16 scale/zero-point per group; "
                "|dx| <= u (1 + 2^-10) range + 2^-20 |x|max + 2^-24")


def int_format(bits: int, granularity: str, group: int) -> IntFormat:
    tag = "t" if granularity == "token" else "c"
    return IntFormat(f"int{bits}_{tag}{group}", "int", granularity, group, bits, SCALE_BITS + ZERO_BITS)
