"""Hadamard-rotated per-token formats (``int3_t64_h``, ``lm4_t64_h``, ...): the cache stores the inner
per-token format of y = H x, H the normalized Sylvester Hadamard matrix of head_dim (a power of two), and
reads x~ = H deq(quant(y)). H is orthogonal and symmetric (H H = I), so ||x~ - x|| is the inner format's
error on y, up to the float32 rounding of the two products, and scores q.x~ are preserved up to it. What
the rotation buys is the range the inner grid spans: a token's outlier channels are spread over all d
coordinates of y, whose range is what the analysis measures as ``d_token_h`` and ``amax_h``.

Reference semantics (the cache implements exactly this, ``hnfverify.kv.rotation``): R(x) is the fast
Walsh–Hadamard transform in float32, L = log2(d) stages of butterflies (a + b, a - b), each rounded, then one
multiplication by fl32(1/sqrt(d)); y = R(x); the inner format quantizes y; x~ = R(w), w the inner format's
float32 values.

Lemma (docs/design.md §2.3c; ``proofs/rotation_error.py`` checks it with exact rationals): with u = 2^-24,
rho = gamma_(L+2) = (L + 2) u / (1 - (L + 2) u), tau = 5 sqrt(d) 2^-126 (underflow, flushed to zero or not)
and N an upper bound of ||x||_2, ||R(x) - H x||_2 <= rho ||x||_2 + tau, hence

    e_f = rho N + tau                          >= ||y - H x||_2
    E_in = inner.l2_error(rotated ranges widened by e_f)
    ||x~ - x||_2 <= E_in + e_f + rho (N + e_f + E_in) + tau.

The rotated ranges are the plan's ``d_token_h`` / ``amax_h`` where given, and what ||H x||_2 = ||x||_2 alone
implies otherwise (amax_h <= sqrt(d) amax, d_token_h <= 2 sqrt(d) amax_h): a plan without them is still
decided, with a looser bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..numbers import sqrt_up
from .base import Format, SegmentStats

U32 = Fraction(1, 2 ** 24)
TINY = Fraction(1, 2 ** 126)


def is_power_of_two(d: int) -> bool:
    return d >= 1 and d & (d - 1) == 0


def rotation_constants(d: int) -> tuple:
    """(rho, tau) of the lemma for head_dim d (a power of two)."""
    n = d.bit_length() - 1 + 2                  # log2(d) butterfly stages, the scale, and the scale's rounding
    return n * U32 / (1 - n * U32), 5 * sqrt_up(Fraction(d)) * TINY


def rotated_ranges(s: SegmentStats) -> tuple:
    """(N, amax_h, d_token_h): upper bounds of ||x||_2, max |(H x)_i| and sqrt(d) (max - min) of H x, each the
    smaller of the measured one (if any) and what ||H x|| = ||x|| implies."""
    sd = sqrt_up(Fraction(s.d))
    norm = s.norm
    amax_h = norm if s.amax_h is None else min(s.amax_h, norm)
    norm = min(norm, sd * amax_h)
    d_h = 2 * sd * amax_h if s.d_token_h is None else min(s.d_token_h, 2 * sd * amax_h)
    return norm, amax_h, d_h


@dataclass(frozen=True)
class RotatedFormat(Format):
    inner: Format | None = None

    @property
    def u(self) -> Fraction:
        return self.inner.u

    def _stages(self, s: SegmentStats) -> tuple:
        """(N, e_f, the ranges of the computed y)."""
        rho, tau = rotation_constants(s.d)
        norm, amax_h, d_h = rotated_ranges(s)
        e_f = rho * norm + tau
        return norm, e_f, SegmentStats(s.d, d_h, d_h, amax_h).widened(e_f)

    def rotated_stats(self, s: SegmentStats) -> SegmentStats:
        return self._stages(s)[2]

    def theorem_diameter(self, s: SegmentStats) -> Fraction:
        return self.inner.theorem_diameter(self.rotated_stats(s))

    def representable(self, s: SegmentStats) -> bool:
        return s.amax <= self.domain_max and self.inner.representable(self.rotated_stats(s))

    def l2_error(self, s: SegmentStats) -> Fraction:
        rho, tau = rotation_constants(s.d)
        norm, e_f, ys = self._stages(s)
        e_in = self.inner.l2_error(ys)
        return e_in + e_f + rho * (norm + e_f + e_in) + tau

    def error_model(self) -> str:
        return ROTATION_MODEL + self.inner.error_model()


#: the rotated formats' error-model text: the rotation's lemma, then the inner format's
ROTATION_MODEL = ("Hadamard-rotated y = FWHT32(x) / sqrt(d); |dx| <= E_in + e_f + rho (N + e_f + E_in) + tau, "
                  "e_f = rho N + tau, rho = gamma_(log2 d + 2), tau = 5 sqrt(d) 2^-126, E_in the inner bound on the "
                  "ranges of y (d_token_h, amax_h) widened by e_f; inner: ")


def rotated(inner: Format) -> RotatedFormat:
    if inner.granularity != "token" or inner.family not in ("int", "codebook"):
        raise ValueError(f"only per-token integer and codebook formats are rotated, not {inner.name}")
    return RotatedFormat(inner.name + "_h", inner.family, inner.granularity, inner.group, inner.value_bits,
                         inner.overhead_bits, inner=inner)
