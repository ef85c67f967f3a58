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


@dataclass(frozen=True)
class ScaledFp8Format(FloatFormat):
    """vLLM's FP8 KV cache (``--kv-cache-dtype fp8_e4m3``, docs/design.md §2.3d): one float32 scale s for a whole
    layer's keys or values (per tensor; 1.0 unless calibrated) or per KV head, fixed in the plan (the format's name
    ``fp8_e4m3_s<s>`` writes it exactly). Reference semantics: y = clamp(x / s, -448, 448) in float32, fp8-e4m3
    round-to-nearest-even, x~ = fp8(y) s in float32. No per-token scale: 8 bits per element. The lemma is the
    per-token one's with s fixed (``proofs/format_error_models.py``): |x - x~| <= (u + 2^-21) |x| + (1 + 2^-21) SUB s
    for |x| <= 448 s; beyond, the clamp's error is unbounded in the model, so the format is representable only
    for segments with amax <= 448 s."""

    scale: Fraction = Fraction(1)

    @property
    def domain_max(self) -> Fraction:
        return self.max_finite * self.scale

    def l2_error(self, s: SegmentStats) -> Fraction:
        return (self.u + Fraction(1, 2 ** 21)) * s.norm + sqrt_up(Fraction(s.d)) * self.sub_error * \
            (1 + Fraction(1, 2 ** 21)) * self.scale

    def error_model(self) -> str:
        return (f"fixed float32 scale s = {fmt_number(self.scale)} (vLLM fp8_e4m3), clamp to +-448, round-to-nearest-"
                f"even; |dx| <= (u + 2^-21)|x| + (1 + 2^-21) {fmt_number(self.sub_error)} s for |x| <= 448 s")

    def to_json(self) -> dict:
        return dict(super().to_json(), scale=fmt_number(self.scale))


def float32_exact(x: Fraction) -> bool:
    """True iff x is a finite positive normal float32 value (so a plan's scale is what the kernel multiplies by)."""
    import struct

    if x <= 0:
        return False
    f = struct.unpack("<f", struct.pack("<f", float(x)))[0]
    return Fraction(f) == x and f >= 2.0 ** -126


def plain_decimal(x: Fraction) -> str:
    """The exact decimal of a dyadic rational x > 0 (every float32 value is one), without an exponent: 0.0029296875."""
    k = 0
    while (x * 10 ** k).denominator != 1:
        k += 1
        if k > 200:
            raise ValueError(f"{x} has no short exact decimal")
    n = str((x * 10 ** k).numerator).rjust(k + 1, "0")
    return n if k == 0 else f"{n[:-k]}.{n[-k:]}"


def scaled_e4m3(scale: Fraction) -> ScaledFp8Format:
    return ScaledFp8Format(f"fp8_e4m3_s{plain_decimal(scale)}", "fp8", "none", 0, 8, 0, mantissa_bits=3, min_exp=-6,
                           max_finite=Fraction(448), scale=scale)
