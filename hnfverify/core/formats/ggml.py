"""llama.cpp's KV-cache types as hnfverify formats (docs/design.md §2.3d): ``q8_0``, ``q4_0``, ``q5_0``,
``q4_1``, ``q5_1``, ``iq4_nl`` (16 fixed non-uniform levels, FP16 d, 4.5 bits; ``proofs/iq4_nl_scale.py``) — per token, blocks of 32 consecutive channels of head_dim, one FP16 scale d per block
(``_0``) or a scale d and a minimum m (``_1``). Bits per element: 8.5, 4.5, 5.5, 5.0, 6.0.

Reference semantics: ggml's ``quantize_row_q*_ref`` as the ``gguf`` package (0.19.0, ``gguf.quants``)
writes them in numpy, which the round-trip tests require bit for bit (``hnfverify.kv.codecs.GgmlCodec``),
every operation in float32:

* q8_0: d = amax / 127, id = 1/d (0 if d = 0), q = roundf(x id) in [-127, 127]; x~ = fp16(d) q.
* q4_0 / q5_0 (n = 8 / 16): M = the element of largest |x| (the first), d = M / -n, q = min(2n - 1,
  trunc(x id + n + 1/2)); x~ = fp16(d) (q - n). The element of the other sign at |x| = |M| lands on
  x id = n and is clamped to n - 1: a full step d away, so the worst case is one step, not half.
* q4_1 / q5_1 (N = 15 / 31): d = (max - min) / N, q = min(N, trunc((x - min) id + 1/2)); x~ = fp16(d) q +
  fp16(min) (two float32 roundings).

Lemmas (``proofs/format_error_models.py``, z3, every float32 and FP16 rounding modelled), per element of a
block with A = max |x| and R = max - min of the block:

* ``_0``:  |x - x~| <= (1/n' + 2^-11)(1 + 2^-9) A + 2^-18, with 1/n' = 1/254 (q8_0), 1/8 (q4_0), 1/16 (q5_0);
* ``_1``:  |x - x~| <= (1/(2N) + 2^-11)(1 + 2^-9) R + (2^-11 + 2^-20) A + 2^-18.

Over a head_dim vector, A <= the segment's amax and R <= its per-token range, so ||dx||_2 is at most
sqrt(d) times the element bound with those (D_token = sqrt(d) (max - min) for the ``_1`` types, the box
[-amax, amax]^d, of diameter 2 sqrt(d) amax, for the ``_0`` types — Theorem 5.7's D and u = half the
leading coefficient per unit of D).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..numbers import fmt_number, sqrt_up
from .base import Format, SegmentStats

BLOCK = 32
SLACK = Fraction(1, 2 ** 9)
FP16_REL = Fraction(1, 2 ** 11)
A_EXTRA = Fraction(1, 2 ** 20)
ABS = Fraction(1, 2 ** 18)
#: name -> (value bits, symmetric, the step divisor: n of d = M / -n (``_0``), N of d = R / N (``_1``))
GGML_TYPES = {"q8_0": (8, True, 127), "q4_0": (4, True, 8), "q5_0": (5, True, 16),
              "q4_1": (4, False, 15), "q5_1": (5, False, 31), "iq4_nl": (4, True, 0)}
#: iq4_nl's levels (ggml's kvalues_iq4nl) and its lemma's constants (``proofs/iq4_nl_scale.py``): the least-squares
#: scale is d0 (1 + delta) with delta in [LAMBDA_LO, LAMBDA_HI], every element within E d0 of d q
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4NL_LAMBDA_HI = Fraction(49, 400)
IQ4NL_LAMBDA_LO = Fraction(-1, 10)
IQ4NL_E = Fraction(2706, 100)
IQ4NL_COEF = IQ4NL_E / 127 + Fraction(1, 2 ** 14) + FP16_REL * (1 + IQ4NL_LAMBDA_HI + Fraction(1, 2 ** 14)) + \
    Fraction(1, 2 ** 22)


@dataclass(frozen=True)
class GgmlFormat(Format):
    """A llama.cpp block type. ``group`` is the block (32 channels of one token)."""

    symmetric: bool = True
    steps: int = 0

    @property
    def coefficient(self) -> Fraction:
        """The lemma's leading coefficient (of A for ``_0``, of R for ``_1``), before the (1 + 2^-9) slack."""
        if self.name == "iq4_nl":                   # its FP16 term is inside (proofs/iq4_nl_scale.py)
            return IQ4NL_COEF
        if self.symmetric:
            # q8_0 rounds to nearest: half a step d = A / 127; q4_0 / q5_0 can clamp: a full step A / n
            return (Fraction(1, 2 * self.steps) if self.steps == 127 else Fraction(1, self.steps)) + FP16_REL
        return Fraction(1, 2 * self.steps) + FP16_REL

    @property
    def u(self) -> Fraction:
        # half the leading coefficient per unit of D: D = 2 sqrt(d) amax (_0) or sqrt(d) (max - min) (_1)
        lead = self.coefficient - (0 if self.name == "iq4_nl" else FP16_REL)
        return lead / 2 if self.symmetric else lead

    def theorem_diameter(self, s: SegmentStats) -> Fraction:
        return 2 * s.norm if self.symmetric else s.d_token

    def element_bound(self, a: Fraction, r: Fraction) -> Fraction:
        """The per-element lemma for a block with max |x| = a and range r."""
        if self.symmetric:
            return self.coefficient * (1 + SLACK) * a + ABS
        return self.coefficient * (1 + SLACK) * r + (FP16_REL + A_EXTRA) * a + ABS

    def l2_error(self, s: SegmentStats) -> Fraction:
        sd = sqrt_up(Fraction(s.d))
        if self.symmetric:
            return self.coefficient * (1 + SLACK) * s.norm + sd * ABS
        return self.coefficient * (1 + SLACK) * s.d_token + (FP16_REL + A_EXTRA) * s.norm + sd * ABS

    def error_model(self) -> str:
        if self.name == "iq4_nl":
            return (f"llama.cpp iq4_nl: blocks of {BLOCK} channels, the nearest of 16 fixed levels at d0 = amax/127, then "
                    "FP16 d = the least-squares scale of those codes; |dx| <= c (1 + 2^-9) amax + 2^-18, c = "
                    f"{fmt_number(IQ4NL_COEF)}")
        if self.symmetric:
            how = "round to nearest" if self.steps == 127 else \
                f"trunc(x/d + {self.steps} + 1/2), clamped at {2 * self.steps - 1}"
            return (f"llama.cpp {self.name}: blocks of {BLOCK} channels, FP16 d = amax/{self.steps} (signed for q4_0/q5_0), "
                    f"{how}; |dx| <= (c + 2^-11)(1 + 2^-9) amax + 2^-18")
        return (f"llama.cpp {self.name}: blocks of {BLOCK} channels, FP16 d = (max - min)/{self.steps} and FP16 min; "
                "|dx| <= (1/(2N) + 2^-11)(1 + 2^-9) range + (2^-11 + 2^-20) amax + 2^-18")

    def to_json(self) -> dict:
        return super().to_json()


def ggml_format(name: str) -> GgmlFormat:
    bits, sym, steps = GGML_TYPES[name]
    return GgmlFormat(name, "ggml", "token", BLOCK, bits, 16 if sym else 32, symmetric=sym, steps=steps)


def ggml_formats(head_dim: int) -> list[GgmlFormat]:
    """The llama.cpp types a model with this head_dim can use: blocks of 32 need 32 | head_dim."""
    return [ggml_format(n) for n in GGML_TYPES] if head_dim % BLOCK == 0 else []
