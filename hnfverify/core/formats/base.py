"""The storage-format interface: one small frozen value per format.

A format knows its bits per element *including* scale/zero-point overhead, its nominal unit
roundoff ``u`` (docs/design.md §2.2, exact rational), its granularity, and its error model: an upper bound
of ||x - dequant(quant(x))||_2 for one cached d-vector, given magnitude and range bounds of the
segment of the cache it stores (:class:`SegmentStats`). Everything is exact (Fraction); no torch.

Subclasses fill in :meth:`l2_error` and :meth:`theorem_diameter`. The same table drives the
planner's accounting and the runtime cache's packing, so bits here are bytes there.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..numbers import fmt_number, sqrt_up
from ..vocabulary import Granularity

GRANULARITIES = Granularity.values()


@dataclass(frozen=True)
class SegmentStats:
    """Upper bounds over the cached vectors of one (layer, KV head, K|V, segment).

    d: head_dim; d_token: max l2 diameter of a vector's per-token box sqrt(d) (max - min);
    d_channel: max l2 diameter of its per-channel-group box; amax: max |x| of any element.
    d_token_h, amax_h: the same of H x, H the normalized Hadamard of head_dim (rotated formats,
    docs/design.md §2.3c); None where not measured.
    """

    d: int
    d_token: Fraction
    d_channel: Fraction
    amax: Fraction
    d_token_h: Fraction | None = None
    amax_h: Fraction | None = None

    @property
    def norm(self) -> Fraction:
        """An upper bound of ||x||_2: sqrt(d) * amax."""
        return sqrt_up(Fraction(self.d)) * self.amax

    def widened(self, delta: Fraction) -> "SegmentStats":
        """Bounds for vectors moved by at most ``delta`` in l2 (so by <= delta per element): what a
        segment holds when its values were already quantized once (re-quantization, docs/design.md §4)."""
        if delta == 0:
            return self
        grow = 2 * sqrt_up(Fraction(self.d)) * delta
        # ||H dx||_2 = ||dx||_2 <= delta: the rotated coordinates move by at most delta too
        return SegmentStats(self.d, self.d_token + grow, self.d_channel + grow, self.amax + delta,
                            None if self.d_token_h is None else self.d_token_h + grow,
                            None if self.amax_h is None else self.amax_h + delta)


@dataclass(frozen=True)
class Format:
    """Base class. ``name`` is unique and is what plan.json refers to."""

    name: str
    family: str                 # "float" | "fp8" | "int" | "codebook"
    granularity: str            # "none" | "token" | "channel"
    group: int                  # elements (token) or tokens (channel) sharing a scale; 0 for none
    value_bits: int             # bits of one stored element
    overhead_bits: int          # bits of scale + zero-point per group

    @property
    def bits_per_element(self) -> Fraction:
        if self.overhead_bits == 0:
            return Fraction(self.value_bits)
        return Fraction(self.value_bits) + Fraction(self.overhead_bits, self.group)

    @property
    def u(self) -> Fraction:  # pragma: no cover - abstract
        raise NotImplementedError

    def theorem_diameter(self, s: SegmentStats) -> Fraction:
        """D of Theorem 5.7: the l2 diameter of the box a vector is quantized over."""
        return s.d_channel if self.granularity == "channel" else s.d_token

    def l2_error(self, s: SegmentStats) -> Fraction:  # pragma: no cover - abstract
        """Upper bound of ||x - dequant(quant(x))||_2 for any vector of the segment."""
        raise NotImplementedError

    def segment_bits(self, n_tokens: int, d: int) -> Fraction:
        """Bits that ``n_tokens`` cached vectors of ``d`` elements really occupy. Channel-grouped
        formats quantize complete groups of ``group`` positions; the incomplete last group is held
        in FP32 (lossless) until it completes — a stream with no recent window (R = 0). A plan's
        streams are counted by ``semantics.segment_bits`` (with R > 0 the incomplete group is held in
        the recent format)."""
        if self.granularity == "channel":
            full = n_tokens - n_tokens % self.group
            return (self.bits_per_element * full + 32 * (n_tokens - full)) * d
        return self.bits_per_element * n_tokens * d

    @property
    def domain_max(self) -> Fraction:
        """The largest |x| for which the error model's lemma holds (docs/design.md §2.3): 65504 for
        FP16 and for the FP16 scale / zero-point of scaled formats."""
        return Fraction(65504)

    def representable(self, s: SegmentStats) -> bool:
        """True iff every value of the segment lies in the format's domain (``amax <= domain_max``)."""
        return s.amax <= self.domain_max

    def error_model(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "granularity": self.granularity,
            "group": self.group,
            "value_bits": self.value_bits,
            "overhead_bits": self.overhead_bits,
            "bits_per_element": fmt_number(self.bits_per_element),
            "u": fmt_number(self.u),
            "error_model": self.error_model(),
        }
