"""An independent exact oracle for hnfverify plans, written from docs/design.md alone.

Standard library only (fractions, json, math, re); imports nothing from hnfverify, by design: it is
the second opinion the fuzzer (tests/fuzz_gate.py) and the adversarial corpus (tests/test_adversarial.py)
hold the gate to. Given a parsed plan it decides

  (a) validity (§3): the schema's structure re-stated by hand, and every loader rule of §3;
  (b) for every stream (layer, KV head, K|V) and every stored form a query can read — found by
      *simulating the cache* (§4: chunks, layout relative to the oldest query, the recent window,
      pending channel groups aligned at absolute multiples of G, R = 0 straight to rest) over many
      chunked update schedules, not by trusting §4's reachable list — Theorem 5.7 in its chain form
      eps >= c kappa_hi sum_k u_k D_k^2 on the widened ranges (§2.2, §2.3) and every stage in its
      domain (|x| <= 65504 for fp16, int*, fp8*; the largest finite number for bf16, fp32);
  (c) E_h <= eps for every head when eps_source is "user" (§2.4);
  (d) the composition law (§2.5): the product form e_L <= eps_target (with mlp_lipschitz), or the suffix form
      Phi = sum_l S_l sqrt(T) b_l + (K/2) sum_l T b_l^2 <= eps_target inside the remainder's radius;
  (e) the KL budget (§2.6): (Gamma Phi)^2 / 8 <= max_kl;
  (f) the claims are upper bounds of the recomputed bounds (§5.5).

Real numbers are intervals of Fractions with outward rounding written here (sqrt by isqrt, exp by a
Taylor sum with a remainder bound and squaring). A comparison is decided exactly when both sides are
exact rationals (one-stage Theorem 5.7, the domains of first stages, validity rules); otherwise it is
"undecidable by oracle" (None) when the two sides lie within one part in 1e12 of each other, since the
document's own quantities are rounded up to 64 significant bits (§2.3-§2.5) and the oracle does not
guess which way that rounding tips a tie.

Two verdicts are reported: ``sound`` (the obligations of the states the simulation reaches: what the
cache can really do; a gate PROVED while this is REFUTED is a false PROVED) and ``doc`` (the states of
§4's reachable list: what the gate should compute). ``findings`` lists every state the simulation
reaches that §4's list misses (a soundness bug of the document) and every listed state it never
reaches (harmless: the document is conservative there).

    import oracle
    res = oracle.decide(plan)            # plan: dict from json (or oracle.load(bytes))
    res.valid, res.reason, res.sound, res.doc, res.obligations, res.findings
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction as Q

__all__ = ["OracleInputError", "load", "validate", "decide", "Result", "Ob", "simulate", "doc_reachable",
           "stream_states", "check_certificate", "canon", "parse", "format_def", "chain_value"]

PREC = 128                   # bits kept by the outward rounding of intermediate results
BAND = Q(1, 10 ** 12)        # "undecidable by oracle" within one part in 1e12 of a threshold
SIM_FULL_T = 96              # up to this max_seq_len every prefill length is simulated
FP16_MAX = Q(65504)


class OracleInputError(Exception):
    """The bytes are not a plan (JSON, duplicate keys, float literals, NaN): the gate must exit 2."""


# ============================================================================ numbers
_NUM = re.compile(r"-?(0|[1-9][0-9]*)((\.[0-9]+)?([eE][-+]?[0-9]+)?|/[1-9][0-9]*)")
_NONNEG = re.compile(r"(0|[1-9][0-9]*)((\.[0-9]+)?([eE][-+]?[0-9]+)?|/[1-9][0-9]*)")
_HUGE, _TINY = Q(10) ** 300, Q(1, 10 ** 300)


class _Bad(Exception):
    def __init__(self, path, msg, kind="schema"):
        super().__init__(f"{path}: {msg}")
        self.path, self.msg, self.kind = path, msg, kind


def is_num(s, nonneg=False) -> bool:
    return isinstance(s, str) and len(s) <= 2000 and (_NONNEG if nonneg else _NUM).fullmatch(s) is not None


_PARSED: dict = {}


def parse(s, path="$") -> Q:
    """A plan number string -> Fraction. Exponents beyond 400 and magnitudes outside [1e-300, 1e300]
    are outside the plan number range (§5: a bound above 1e300 is written null)."""
    if isinstance(s, str) and s in _PARSED:
        return _PARSED[s]
    x = _parse(s, path)
    if len(_PARSED) > 200000:
        _PARSED.clear()
    _PARSED[s] = x
    return x


def _parse(s, path):
    if not is_num(s):
        raise _Bad(path, f"{s!r} is not a decimal or p/q number string")
    m = re.search(r"[eE]([-+]?[0-9]+)$", s)
    if m and abs(int(m.group(1))) > 400:
        raise _Bad(path, f"exponent of {s[:40]!r} is out of range", "range")
    x = Q(s)
    if x != 0 and not (_TINY <= abs(x) <= _HUGE):
        raise _Bad(path, f"{s[:40]!r} is outside the plan number range [1e-300, 1e300]", "range")
    return x


def canon(x) -> str:
    """The canonical string of an exact number (integers plainly, scientific for six or more trailing
    zeros; terminating decimals as decimals, scientific below 1e-6; anything else p/q)."""
    x = Q(x)
    if x.denominator == 1:
        n = x.numerator
        digits = str(abs(n))
        zeros = len(digits) - len(digits.rstrip("0"))
        if zeros >= 6:
            sig = digits.rstrip("0")
            return f"{'-' if n < 0 else ''}{sig[0]}{'.' + sig[1:] if len(sig) > 1 else ''}E+{len(digits) - 1}"
        return str(n)
    d = x.denominator
    twos = (d & -d).bit_length() - 1
    rest, fives = d >> twos, 0
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    if rest != 1:
        return f"{x.numerator}/{x.denominator}"
    k = max(twos, fives)
    num = x.numerator * 10 ** k // d
    sign = "-" if num < 0 else ""
    digits = str(abs(num)).rjust(k + 1, "0")
    whole, frac = digits[:-k], digits[-k:].rstrip("0")
    lead = len(frac) - len(frac.lstrip("0"))
    if whole == "0" and lead >= 6:
        sig = frac.lstrip("0")
        return f"{sign}{sig[0]}{'.' + sig[1:] if len(sig) > 1 else ''}E-{lead + 1}"
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


# ============================================================================ outward rounding
def rdown(x: Q, bits: int = PREC) -> Q:
    """The largest dyadic with ``bits`` significant bits <= x (x >= 0)."""
    if x <= 0:
        return Q(math.floor(x)) if x < 0 else Q(0)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    sh = bits - e
    if sh >= 0:
        return Q((x.numerator << sh) // x.denominator, 1 << sh)
    return Q((x.numerator // (x.denominator << -sh)) << -sh)


def rup(x: Q, bits: int = PREC) -> Q:
    """The smallest dyadic with ``bits`` significant bits >= x (x >= 0)."""
    if x <= 0:
        return Q(0) if x == 0 else -rdown(-x, bits)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    sh = bits - e
    if sh >= 0:
        return Q(-((-x.numerator << sh) // x.denominator), 1 << sh)
    return Q(-((-x.numerator) // (x.denominator << -sh)) << -sh)


def sqrt_bounds(x: Q) -> tuple:
    """(lo, hi) with lo <= sqrt(x) <= hi, exact for perfect squares."""
    if x < 0:
        raise ValueError("sqrt of a negative number")
    if x == 0:
        return Q(0), Q(0)
    n, d = x.numerator, x.denominator
    rn, rd = math.isqrt(n), math.isqrt(d)
    if rn * rn == n and rd * rd == d:
        return Q(rn, rd), Q(rn, rd)
    sc = PREC + max(0, d.bit_length() - n.bit_length())
    r = math.isqrt((n << (2 * sc)) // d)          # r <= sqrt(x) 2^sc < r + 1 (floor of a floor)
    lo, hi = Q(r, 1 << sc), Q(r + 1, 1 << sc)
    while hi * hi < x:                              # never taken; kept as a guard of the claim
        hi += Q(1, 1 << sc)
    return lo, hi


EXP_EXACT_MAX = Q(100000)      # above this the oracle does not compute exp(x) exactly
_LN2_HI = Q(6931471805599453094172321214581766, 10 ** 34)     # > ln 2


def _dy_round(m: int, e: int, upper: bool, bits: int = PREC) -> tuple:
    """m 2^e rounded to ``bits`` significant bits (floor or ceil), as (m', e')."""
    n = m.bit_length() - bits
    if n <= 0:
        return m, e
    q = m >> n
    if upper and (q << n) != m:
        q += 1
    return q, e + n


def _exp_dyadic(x: Q, upper: bool) -> Q:
    """A bound of exp(x), x >= 0, in integer fixed point: y = x / 2^s <= 1/2, the Taylor sum of
    exp(y) to 40 terms (a lower bound; plus, for the upper bound, the remainder
    <= 2 y^41 / 41!, the tail's terms shrinking by at least 1/2), then s squarings; every step rounded
    down (lower) or up (upper)."""
    s = 0
    num, den = x.numerator, x.denominator
    while num * 2 > den:                 # y = num / (den 2^s) > 1/2
        den *= 2
        s += 1
    p = PREC + 32
    one = 1 << p
    y = -((-num << p) // den) if upper else (num << p) // den      # y 2^p, rounded outward
    total, term = one, one
    n = 40
    for k in range(1, n + 1):
        if upper:
            term = -((-term * y) // (k << p))
        else:
            term = (term * y) // (k << p)
        total += term
    if upper:
        total += -((-2 * term * y) // ((n + 1) << p))
    m, e = _dy_round(total, -p, upper)
    for _ in range(s):
        m, e = _dy_round(m * m, 2 * e, upper)
    return Q(m) * Q(2) ** e if e >= 0 else Q(m, 1 << -e)


def exp_bounds(lo: Q, hi) -> tuple:
    """(L, H) with L <= exp(lo) and exp(hi) <= H (lo, hi >= 0); H is None (+inf) for hi above 1e5."""
    if lo > EXP_EXACT_MAX:
        # exp(x) >= 2^(x / ln2) > 2^floor(x / LN2_HI); capped (still a lower bound) to stay small
        k = min(int(lo / _LN2_HI), 4000)
        low = Q(2) ** k
    else:
        low = _exp_dyadic(Q(lo), False)
    if hi is None or hi > EXP_EXACT_MAX:
        return low, None
    return low, _exp_dyadic(Q(hi), True)


class R:
    """A real number known to lie in [lo, hi] (hi None: unbounded above). ``exact``: lo == hi and the
    document computes it without rounding (a rational decided exactly)."""

    __slots__ = ("lo", "hi", "exact")

    def __init__(self, lo, hi=None, exact=None, point=False):
        lo = Q(lo)
        if point:
            hi = lo
        self.lo, self.hi = lo, (None if hi is None else Q(hi))
        self.exact = (self.hi is not None and self.lo == self.hi) if exact is None else exact
        if self.hi is not None and self.hi < self.lo:
            raise ValueError("empty interval")

    @staticmethod
    def of(x) -> "R":
        return R(x, point=True)

    def _norm(self):
        """Round outward to PREC bits, except small exact rationals (kept exact for exact decisions)."""
        def big(x):
            return x is not None and x.numerator.bit_length() + x.denominator.bit_length() > 4000
        if self.exact and not big(self.lo):
            return self
        def short(x):
            return x is None or x.denominator.bit_length() < 2 * PREC
        if not self.exact and not big(self.lo) and not big(self.hi) and short(self.lo) and short(self.hi):
            return self
        lo, hi = rdown(self.lo), (None if self.hi is None else rup(self.hi))
        return R(lo, hi, self.exact and lo == self.lo and hi == self.hi)

    def __add__(self, o):
        o = o if isinstance(o, R) else R.of(o)
        hi = None if self.hi is None or o.hi is None else self.hi + o.hi
        return R(self.lo + o.lo, hi, self.exact and o.exact)._norm()

    __radd__ = __add__

    def __mul__(self, o):
        o = o if isinstance(o, R) else R.of(o)
        assert self.lo >= 0 and o.lo >= 0, "the oracle multiplies non-negative quantities only"
        if self.hi is None or o.hi is None:
            hi = Q(0) if (self.hi == 0 or o.hi == 0) else None
        else:
            hi = self.hi * o.hi
        return R(self.lo * o.lo, hi, self.exact and o.exact)._norm()

    __rmul__ = __mul__

    def minus_one(self):
        """x - 1 for x >= 1 (e^y - 1)."""
        return R(self.lo - 1, None if self.hi is None else self.hi - 1, self.exact)

    def inexact(self):
        return R(self.lo, self.hi, False)

    def approx(self) -> float:
        x = self.lo if self.hi is None else (self.lo + self.hi) / 2
        try:
            return float(x)
        except OverflowError:
            return float("inf")

    def __repr__(self):
        return f"R[{float(self.lo):.17g}, {'inf' if self.hi is None else f'{float(self.hi):.17g}'}" \
               f"{', exact' if self.exact else ''}]"


def rmax(*xs) -> R:
    lo = max(x.lo for x in xs)
    hi = None if any(x.hi is None for x in xs) else max(x.hi for x in xs)
    return R(lo, hi, all(x.exact for x in xs))


def rsqrt(x: Q) -> R:
    lo, hi = sqrt_bounds(Q(x))
    return R(lo, hi, lo == hi)


def rexp(x: R) -> R:
    lo, hi = exp_bounds(x.lo, x.hi)
    return R(lo, hi, x.exact and x.lo == 0)


def le(a: R, b: R):
    """a <= b: True, False, or None (undecidable by oracle: within BAND of each other, or the intervals
    overlap)."""
    if a.exact and b.exact:
        return a.lo <= b.lo
    if a.hi is not None and b.hi is not None:
        ma, mb = (a.lo + a.hi) / 2, (b.lo + b.hi) / 2
        if abs(ma - mb) <= BAND * max(abs(ma), abs(mb)):
            return None
    if a.hi is not None and a.hi <= b.lo:
        return True
    if b.hi is not None and a.lo > b.hi:
        return False
    return None


# ============================================================================ formats (§2.2, §2.3)
_FLOATS = {"fp32": (23, -126, (2 - Q(1, 2 ** 23)) * Q(2) ** 127, 32),
           "fp16": (10, -14, Q(65504), 16),
           "bf16": (7, -126, (2 - Q(1, 2 ** 7)) * Q(2) ** 127, 16)}
_FP8 = {"e4m3": (3, -6, Q(448)), "e5m2": (2, -14, Q(57344))}
_INT_MODEL = ("asymmetric round-to-nearest, FP16 zero-point (rounded down) and scale (rounded up) per group; "
              "|dx| <= u (1 + 2^-9) range + (u 2^-9 + 2^-20) |x|max + 2^-23")
_LM_MODEL = ("asymmetric nearest of the Lloyd-Max levels, FP16 zero-point (rounded down) and scale (rounded up) "
             "per group; |dx| <= u (1 + 2^-9) range + (u 2^-9 + 2^-20) |x|max + 2^-23")
# the codebook levels in 32nds of the scale (docs/design.md §2.3b); u = W / (2^b - 1), W the largest distance
# from a point of [0, 2^b - 1] to its nearest level
_LM_LEVELS = {2: (16, 39, 58, 80), 3: (14, 50, 77, 101, 125, 149, 176, 211),
              4: (8, 54, 91, 123, 152, 179, 204, 229, 254, 279, 305, 331, 360, 391, 428, 473)}
_FNAME = re.compile(r"fp32|fp16|bf16|fp8_(e4m3|e5m2)_t([1-9][0-9]*)|(int(?:8|4|3|2)|lm(?:4|3|2))_(t|c)([1-9][0-9]*)")
# §2.3c: the Hadamard-rotated per-token formats, the inner format of y = H x
_ROT_MODEL = ("Hadamard-rotated y = FWHT32(x) / sqrt(d); |dx| <= E_in + e_f + rho (N + e_f + E_in) + tau, "
              "e_f = rho N + tau, rho = gamma_(log2 d + 2), tau = 5 sqrt(d) 2^-126, E_in the inner bound on the "
              "ranges of y (d_token_h, amax_h) widened by e_f; inner: ")


def _lm_u(b):
    lv = [Q(n, 32) for n in _LM_LEVELS[b]]
    top = 2 ** b - 1
    w = max([lv[0], top - lv[-1]] + [(y - x) / 2 for x, y in zip(lv, lv[1:])])
    return w / top


# §2.3d: llama.cpp's block types (code bits, step n of d = M / -n or amax / 127, N of d = range / N) and iq4_nl
_GGML = {"q8_0": (8, "sym", 127), "q4_0": (4, "sym", 8), "q5_0": (5, "sym", 16), "q4_1": (4, "asym", 15),
         "q5_1": (5, "asym", 31), "iq4_nl": (4, "nl", 0)}
_IQ4NL_C = Q(2706, 100) / 127 + Q(1, 2 ** 14) + Q(1, 2 ** 11) * (1 + Q(49, 400) + Q(1, 2 ** 14)) + Q(1, 2 ** 22)


def _plain_float32(s: str):
    """The value of an exact decimal that is a positive normal float32, else None (an fp8_e4m3_s scale): x in
    [2^-126, (2 - 2^-23) 2^127] with a significand of at most 24 bits, x = m 2^(e - 23), 2^23 <= m < 2^24."""
    x = Q(s)
    if x < Q(2) ** -126 or x > (2 - Q(1, 2 ** 23)) * Q(2) ** 127:
        return None
    e = x.numerator.bit_length() - x.denominator.bit_length()       # 2^e <= x < 2^(e + 2)
    while Q(2) ** e > x:
        e -= 1
    while Q(2) ** (e + 1) <= x:
        e += 1
    m = x / Q(2) ** (e - 23)
    return x if m.denominator == 1 else None


def _engine_def(name):
    if name in _GGML:
        b, kind, n = _GGML[name]
        if kind == "nl":
            c = _IQ4NL_C
            lead = c
            em = ("llama.cpp iq4_nl: blocks of 32 channels, the nearest of 16 fixed levels at d0 = amax/127, then "
                  f"FP16 d = the least-squares scale of those codes; |dx| <= c (1 + 2^-9) amax + 2^-18, c = {canon(c)}")
        elif kind == "sym":
            lead = Q(1, 254) if n == 127 else Q(1, n)
            c = lead + Q(1, 2 ** 11)
            how = "round to nearest" if n == 127 else f"trunc(x/d + {n} + 1/2), clamped at {2 * n - 1}"
            em = (f"llama.cpp {name}: blocks of 32 channels, FP16 d = amax/{n} (signed for q4_0/q5_0), {how}; "
                  "|dx| <= (c + 2^-11)(1 + 2^-9) amax + 2^-18")
        else:
            lead = Q(1, 2 * n)
            c = lead + Q(1, 2 ** 11)
            em = (f"llama.cpp {name}: blocks of 32 channels, FP16 d = (max - min)/{n} and FP16 min; "
                  "|dx| <= (1/(2N) + 2^-11)(1 + 2^-9) range + (2^-11 + 2^-20) amax + 2^-18")
        over = 32 if kind == "asym" else 16
        u = lead if kind == "asym" else lead / 2
        entry = {"family": "ggml", "granularity": "token", "group": 32, "value_bits": b, "overhead_bits": over,
                 "bits_per_element": canon(b + Q(over, 32)), "u": canon(u), "error_model": em}
        return {"name": name, "kind": "ggml", "sym": kind != "asym", "coef": c, "u": u, "domain": FP16_MAX,
                "gran": "token", "group": 32, "entry": entry}
    m = re.fullmatch(r"fp8_e4m3_s((0|[1-9][0-9]*)(\.[0-9]*[1-9])?)", name)
    s = _plain_float32(m.group(1)) if m else None
    if s is None:
        return None
    sub = Q(2) ** -10
    entry = {"family": "fp8", "granularity": "none", "group": 0, "value_bits": 8, "overhead_bits": 0,
             "bits_per_element": "8", "u": canon(Q(1, 16)), "scale": canon(s),
             "error_model": f"fixed float32 scale s = {canon(s)} (vLLM fp8_e4m3), clamp to +-448, round-to-nearest-"
                            f"even; |dx| <= (u + 2^-21)|x| + (1 + 2^-21) {canon(sub)} s for |x| <= 448 s"}
    return {"name": name, "kind": "fp8s", "u": Q(1, 16), "sub": sub, "scale": s, "domain": 448 * s, "gran": "none",
            "group": 0, "entry": entry}


def format_def(name):
    """The definition of a named format: its table entry (``entry``) and what the bounds need."""
    if not isinstance(name, str):
        return None
    eng = _engine_def(name)
    if eng is not None:
        return eng
    if name.endswith("_h"):
        inner = format_def(name[:-2])
        if inner is None or inner["kind"] != "int" or inner["gran"] != "token" or inner.get("rot"):
            return None
        entry = dict(inner["entry"], error_model=_ROT_MODEL + inner["entry"]["error_model"])
        return dict(inner, name=name, rot=True, inner=inner, entry=entry)
    m = _FNAME.fullmatch(name)
    if not m:
        return None
    if name in _FLOATS:
        mant, emin, mx, bits = _FLOATS[name]
        u, sub = Q(1, 2 ** (mant + 1)), Q(2) ** (emin - mant - 1)
        entry = {"family": "float", "granularity": "none", "group": 0, "value_bits": bits, "overhead_bits": 0,
                 "bits_per_element": canon(bits), "u": canon(u),
                 "error_model": f"round-to-nearest; |dx| <= u|x| (normal), <= {canon(sub)} (subnormal); "
                                f"overflow above {canon(mx)}"}
        return {"name": name, "kind": "float", "u": u, "sub": sub, "max": mx, "domain": mx, "gran": "none",
                "group": 0, "entry": entry}
    if m.group(1):
        mant, emin, mx = _FP8[m.group(1)]
        g = int(m.group(2))
        u, sub = Q(1, 2 ** (mant + 1)), Q(2) ** (emin - mant - 1)
        entry = {"family": "fp8", "granularity": "token", "group": g, "value_bits": 8, "overhead_bits": 16,
                 "bits_per_element": canon(8 + Q(16, g)), "u": canon(u),
                 "error_model": f"per-token FP16 scale s >= amax/{canon(mx)}, clamp, round-to-nearest-even; "
                                f"|dx| <= (u + 2^-21)|x| + (1 + 2^-21) {canon(sub)} s"}
        return {"name": name, "kind": "fp8", "u": u, "sub": sub, "max": mx, "domain": FP16_MAX, "gran": "token",
                "group": g, "entry": entry}
    kind, g = m.group(3), int(m.group(5))
    b = int(kind[-1])
    gran = "token" if m.group(4) == "t" else "channel"
    lm = kind.startswith("lm")
    u = _lm_u(b) if lm else Q(1, 2 * (2 ** b - 1))
    entry = {"family": "codebook" if lm else "int", "granularity": gran, "group": g, "value_bits": b,
             "overhead_bits": 32, "bits_per_element": canon(b + Q(32, g)), "u": canon(u),
             "error_model": _LM_MODEL if lm else _INT_MODEL}
    return {"name": name, "kind": "int", "u": u, "domain": FP16_MAX, "gran": gran, "group": g, "entry": entry}


def rotated_stage(f, dt, dc, amax, dth, amh, sd: R, d: int):
    """A rotated format's (error, D of the inner grid, amax of the rotated values) for ranges (§2.3c): the inner
    format's bound on the ranges of the computed H x, and the two rotations' rounding."""
    n = d.bit_length() + 1
    rho = R.of(n * Q(1, 2 ** 24) / (1 - n * Q(1, 2 ** 24)))
    tau = sd * Q(5, 2 ** 126)
    norm = sd * amax
    a_h = norm if amh is None else rmin(amh, norm)
    norm = rmin(norm, sd * a_h)
    d_h = (sd * 2) * a_h if dth is None else rmin(dth, (sd * 2) * a_h)
    e = rho * norm + tau
    y_d, y_am = d_h + (sd * 2) * e, a_h + e
    ein = stage_error(f["inner"], y_d, y_d, y_am, sd)
    return ein + e + rho * (norm + e + ein) + tau, y_d, y_am


def stage_error(f, dt: R, dc: R, amax: R, sd: R) -> R:
    """err(f, ranges): the format's l2 error bound for one cached d-vector (§2.3; formats' lemmas)."""
    norm = sd * amax
    if f["kind"] == "float":
        return f["u"] * norm + sd * f["sub"]
    if f["kind"] == "fp8":
        scale = rmax(amax * ((1 + Q(1, 2 ** 9)) / f["max"]), R.of(Q(1, 2 ** 14)))
        return (f["u"] + Q(1, 2 ** 21)) * norm + sd * (f["sub"] * (1 + Q(1, 2 ** 21))) * scale
    if f["kind"] == "fp8s":
        return (f["u"] + Q(1, 2 ** 21)) * norm + sd * (f["sub"] * (1 + Q(1, 2 ** 21)) * f["scale"])
    if f["kind"] == "ggml":
        lead = f["coef"] * (1 + Q(1, 2 ** 9))
        if f["sym"]:
            return lead * norm + sd * Q(1, 2 ** 18)
        return lead * dt + (Q(1, 2 ** 11) + Q(1, 2 ** 20)) * norm + sd * Q(1, 2 ** 18)
    diam = dc if f["gran"] == "channel" else dt
    return (f["u"] * (1 + Q(1, 2 ** 9))) * diam + (f["u"] * Q(1, 2 ** 9) + Q(1, 2 ** 20)) * norm + sd * Q(1, 2 ** 23)


_CHAINS: dict = {}


def chain_value(fmts: list, dt, dc, amax, dth, amh, d: int, kappa) -> dict:
    """Walk a chain of formats over the reader's ranges (§2.2, §2.3): every stage's widened ranges,
    its error, its domain, and sum_k u_k D_k^2 (the Theorem 5.7 right-hand side without c kappa).
    dth, amh: the rotated ranges d_token_h, amax_h (None: not given)."""
    key = (tuple(f["name"] for f in fmts), dt, dc, amax, dth, amh, d)
    if key not in _CHAINS:
        if len(_CHAINS) > 100000:
            _CHAINS.clear()
        _CHAINS[key] = _chain_value(fmts, Q(dt), Q(dc), Q(amax), dth, amh, d)
    return dict(_CHAINS[key], kappa=Q(kappa))


def _chain_value(fmts, dt, dc, amax, dth, amh, d):
    sd = rsqrt(Q(d))
    dt, dc, amax = R.of(dt), R.of(dc), R.of(amax)
    dth, amh = (None if x is None else R.of(Q(x)) for x in (dth, amh))
    e = None
    stages = []
    total = R.of(0)
    dom = True
    for f in fmts:
        if e is None:
            w_dt, w_dc, w_amax, w_dth, w_amh = dt, dc, amax, dth, amh
        else:
            grow = (sd * 2) * e
            w_dt, w_dc, w_amax = dt + grow, dc + grow, amax + e
            w_dth, w_amh = None if dth is None else dth + grow, None if amh is None else amh + e
        diam = w_dc if f["gran"] == "channel" else w_dt
        if f["kind"] == "ggml" and f["sym"]:                # the box [-amax, amax]^d (§2.3d)
            diam = (sd * 2) * w_amax
        checks = [w_amax]
        if f.get("rot"):
            err, diam, y_am = rotated_stage(f, w_dt, w_dc, w_amax, w_dth, w_amh, sd, d)
            checks.append(y_am)
        else:
            err = stage_error(f, w_dt, w_dc, w_amax, sd)
        for a in checks:
            ok = le(a, R.of(f["domain"]))
            if ok is False:
                dom = False
            elif ok is None and dom is not False:
                dom = None
        e = err if e is None else (e + err).inexact()       # e_k = round_up(e_(k-1) + err): §2.3
        total = total + f["u"] * diam * diam
        stages.append({"format": f["name"], "u": f["u"], "D": diam, "amax": w_amax, "error": e})
    if len(fmts) > 1:
        total = total.inexact()
    return {"stages": stages, "error": e if e is not None else R.of(0), "sum_uD2": total, "domain": dom}


# ============================================================================ JSON loading
def load(data: bytes) -> dict:
    """Bytes -> plan dict, refusing what no plan may contain (§3: no floats, one grammar)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OracleInputError("not UTF-8") from None

    def pairs(ps):
        out = {}
        for k, v in ps:
            if k in out:
                raise OracleInputError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def no_float(s):
        raise OracleInputError(f"float literal {s[:20]}")

    def no_const(s):
        raise OracleInputError(f"{s} is not a number")

    try:
        obj = json.loads(text, object_pairs_hook=pairs, parse_float=no_float, parse_constant=no_const)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        if isinstance(e, OracleInputError):
            raise
        raise OracleInputError(f"not JSON: {type(e).__name__}") from None
    try:
        _no_surrogates(obj)
    except RecursionError:
        raise OracleInputError("nested too deeply") from None
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(x):
    """A \\uD800-\\uDFFF escape without its pair is not a character: such a string is not text."""
    if isinstance(x, str):
        if _SURROGATE.search(x):
            raise OracleInputError("a lone surrogate in a string")
    elif isinstance(x, dict):
        for k, v in x.items():
            _no_surrogates(k)
            _no_surrogates(v)
    elif isinstance(x, list):
        for v in x:
            _no_surrogates(v)


# ============================================================================ validity (§3)
def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _obj(x, path, required, optional=(), extra=None):
    if not isinstance(x, dict):
        raise _Bad(path, "must be an object")
    for k in required:
        if k not in x:
            raise _Bad(path, f"missing {k!r}")
    if extra is None:
        allowed = set(required) | set(optional)
        for k in x:
            if k not in allowed:
                raise _Bad(f"{path}.{k}", "unexpected property")
    else:
        for k, v in x.items():
            if k not in required and k not in optional and not extra(v):
                raise _Bad(f"{path}.{k}", "wrong type")
    return x


def _int(x, path, lo=None, hi=None):
    if not _is_int(x):
        raise _Bad(path, "must be an integer")
    if lo is not None and x < lo or hi is not None and x > hi:
        raise _Bad(path, f"out of range [{lo}, {hi}]")
    return x


def _str(x, path):
    if not isinstance(x, str):
        raise _Bad(path, "must be a string")
    return x


def _numstr(x, path, nonneg=True):
    if not is_num(x, nonneg):
        raise _Bad(path, f"{x!r} is not a{' non-negative' if nonneg else ''} number string")
    return x


INPUT_KEYS = ("kappa", "d_token", "d_channel", "amax", "alpha", "qnorm", "vo", "mass_alpha", "mass_avo")
INPUT_KEYS_H = ("d_token_h", "amax_h")          # optional: the rotated formats' ranges (§2.3c)
LIP_KEYS = ("lipschitz", "mlp_lipschitz")


def _schema(p):
    """The structure of specs/plan.schema.json (types, required keys, closed objects, grammars)."""
    _obj(p, "$", ["schema_version", "kind", "tool", "model", "calibration", "analysis", "shape", "max_seq_len",
                  "eps", "eps_source", "eps_target", "max_kl", "composition", "c", "mode", "rule", "formats", "layers",
                  "assumptions", "claims"])
    if p["schema_version"] != 1 or not _is_int(p["schema_version"]):
        raise _Bad("$.schema_version", "must be 1")
    if p["kind"] != "hnfverify-plan":
        raise _Bad("$.kind", "must be hnfverify-plan")
    _obj(p["tool"], "$.tool", [], extra=lambda v: isinstance(v, str))
    for k in ("name", "version"):
        _str(p["tool"].get(k), f"$.tool.{k}")
    _obj(p["model"], "$.model", [], extra=lambda v: isinstance(v, str))
    for k in ("name", "config_sha256"):
        _str(p["model"].get(k), f"$.model.{k}")
    _obj(p["calibration"], "$.calibration", [], extra=lambda v: isinstance(v, str))
    _str(p["calibration"].get("token_ids_sha256"), "$.calibration.token_ids_sha256")
    a = _obj(p["analysis"], "$.analysis", ["report", "arrays_sha256", "curvature", "channel_group"])
    _str(a["report"], "$.analysis.report")
    if not isinstance(a["arrays_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", a["arrays_sha256"]):
        raise _Bad("$.analysis.arrays_sha256", "must be 64 hex digits")
    if a["curvature"] not in ("exact", "seed"):
        raise _Bad("$.analysis.curvature", "must be exact or seed")
    _int(a["channel_group"], "$.analysis.channel_group", 1)
    s = _obj(p["shape"], "$.shape", ["layers", "kv_heads", "query_heads", "head_dim"])
    for k in ("layers", "kv_heads", "query_heads", "head_dim"):
        _int(s[k], f"$.shape.{k}", 1, 100000)
    _int(p["max_seq_len"], "$.max_seq_len", 1, 100000000)
    _numstr(p["eps"], "$.eps")
    if p["eps_source"] not in ("user", "implied"):
        raise _Bad("$.eps_source", "must be user or implied")
    if p["eps_target"] is not None:
        _numstr(p["eps_target"], "$.eps_target")
    if p["max_kl"] is not None:
        _numstr(p["max_kl"], "$.max_kl")
    comp = _obj(p["composition"], "$.composition", ["form", "remainder", "logit_gain"])
    if comp["form"] not in ("suffix", "product"):
        raise _Bad("$.composition.form", "must be suffix or product")
    for ck, keys in (("remainder", ["measured", "margin", "value", "radius"]), ("logit_gain", ["measured", "margin", "value"])):
        if comp[ck] is not None:
            g = _obj(comp[ck], f"$.composition.{ck}", keys)
            for k in keys:
                _numstr(g[k], f"$.composition.{ck}.{k}")
    _numstr(p["c"], "$.c")
    m = _obj(p["mode"], "$.mode", ["kind", "value", "budget_split"])
    if m["kind"] not in ("eps", "avg_bits", "uniform", "assigned"):
        raise _Bad("$.mode.kind", "unknown mode")
    _str(m["value"], "$.mode.value")
    _str(m["budget_split"], "$.mode.budget_split")
    r = _obj(p["rule"], "$.rule", ["sink", "recent"], optional=["error_norms"])
    if "error_norms" in r and r["error_norms"] != "u8log":
        raise _Bad("$.rule.error_norms", "must be u8log")
    for k in ("sink", "recent"):
        _int(r[k], f"$.rule.{k}", 0, 100000000)
    f = p["formats"]
    if not isinstance(f, dict) or not f:
        raise _Bad("$.formats", "must be a non-empty object")
    for name, spec in f.items():
        fp = f"$.formats.{name}"
        if format_def(name) is None:
            raise _Bad(fp, "unknown format name")
        _obj(spec, fp, ["family", "granularity", "group", "value_bits", "overhead_bits", "bits_per_element", "u",
                        "error_model"], ["scale"])
        if "scale" in spec:
            _numstr(spec["scale"], f"{fp}.scale")
        if spec["family"] not in ("float", "fp8", "int", "codebook", "ggml"):
            raise _Bad(f"{fp}.family", "unknown family")
        if spec["granularity"] not in ("none", "token", "channel"):
            raise _Bad(f"{fp}.granularity", "unknown granularity")
        _int(spec["group"], f"{fp}.group", 0)
        _int(spec["value_bits"], f"{fp}.value_bits", 1, 64)
        _int(spec["overhead_bits"], f"{fp}.overhead_bits", 0)
        _numstr(spec["bits_per_element"], f"{fp}.bits_per_element")
        _numstr(spec["u"], f"{fp}.u")
        _str(spec["error_model"], f"{fp}.error_model")
    layers = p["layers"]
    if not isinstance(layers, list) or not layers:
        raise _Bad("$.layers", "must be a non-empty array")
    for li, la in enumerate(layers):
        lp = f"$.layers[{li}]"
        _obj(la, lp, ["layer", "tau", "lipschitz", "mlp_lipschitz", "suffix", "heads"])
        _int(la["layer"], f"{lp}.layer", 0)
        _numstr(la["tau"], f"{lp}.tau")
        for lk in LIP_KEYS + (("suffix",) if la["suffix"] is not None else ()):
            lip = _obj(la[lk], f"{lp}.{lk}", ["measured", "margin", "value"])
            for k in ("measured", "margin", "value"):
                _numstr(lip[k], f"{lp}.{lk}.{k}")
        if not isinstance(la["heads"], list) or not la["heads"]:
            raise _Bad(f"{lp}.heads", "must be a non-empty array")
        for hi, h in enumerate(la["heads"]):
            hp = f"{lp}.heads[{hi}]"
            _obj(h, hp, ["kv_head", "o_proj_norm", "q_max", "K", "V"])
            _int(h["kv_head"], f"{hp}.kv_head", 0)
            _numstr(h["o_proj_norm"], f"{hp}.o_proj_norm")
            _numstr(h["q_max"], f"{hp}.q_max")
            for kv in ("K", "V"):
                rp = f"{hp}.{kv}"
                rule = _obj(h[kv], rp, ["sink", "recent", "rest", "blocks"])
                for seg in ("sink", "recent", "rest"):
                    sp = f"{rp}.{seg}"
                    req = ["format", "inputs"] + (["length"] if seg != "rest" else [])
                    item = _obj(rule[seg], sp, req, ["length"])
                    if "length" in item:
                        _int(item["length"], f"{sp}.length", 0, 100000000)
                    if not isinstance(item["format"], str) or format_def(item["format"]) is None:
                        raise _Bad(f"{sp}.format", "not a format name")
                    if item["inputs"] is not None:
                        _inputs(item["inputs"], f"{sp}.inputs")
                if not isinstance(rule["blocks"], list):
                    raise _Bad(f"{rp}.blocks", "must be an array")
                for bi, b in enumerate(rule["blocks"]):
                    bp = f"{rp}.blocks[{bi}]"
                    _obj(b, bp, ["start", "end", "format", "inputs"])
                    _int(b["start"], f"{bp}.start", 0, 100000000)
                    _int(b["end"], f"{bp}.end", 0, 100000000)
                    if not isinstance(b["format"], str) or format_def(b["format"]) is None:
                        raise _Bad(f"{bp}.format", "not a format name")
                    _inputs(b["inputs"], f"{bp}.inputs")
    if not isinstance(p["assumptions"], list):
        raise _Bad("$.assumptions", "must be an array")
    for ai, asm in enumerate(p["assumptions"]):
        ap = f"$.assumptions[{ai}]"
        _obj(asm, ap, ["name", "statement", "value", "margin", "provenance"])
        _str(asm["name"], f"{ap}.name")
        _str(asm["statement"], f"{ap}.statement")
        _numstr(asm["value"], f"{ap}.value", nonneg=False)
        _numstr(asm["margin"], f"{ap}.margin", nonneg=False)
        if not isinstance(asm["provenance"], dict):
            raise _Bad(f"{ap}.provenance", "must be an object")
    c = _obj(p["claims"], "$.claims", ["avg_bits", "compression_vs_fp16", "cache_bits_at_max_seq_len", "layer_bounds",
                                       "end_to_end_bound", "theorem_5_7_violations", "attention_error_max",
                                       "logit_bound", "kl_bound"])
    for k in ("avg_bits", "compression_vs_fp16", "cache_bits_at_max_seq_len"):
        _numstr(c[k], f"$.claims.{k}", nonneg=False)
    for k in ("layer_bounds", "attention_error_max"):
        if not isinstance(c[k], list):
            raise _Bad(f"$.claims.{k}", "must be an array")
        for i, x in enumerate(c[k]):
            if x is not None:
                _numstr(x, f"$.claims.{k}[{i}]", nonneg=False)
    for k in ("end_to_end_bound", "logit_bound", "kl_bound"):
        if c[k] is not None:
            _numstr(c[k], f"$.claims.{k}", nonneg=False)
    _int(c["theorem_5_7_violations"], "$.claims.theorem_5_7_violations", 0)


def _inputs(x, path):
    _obj(x, path, list(INPUT_KEYS), list(INPUT_KEYS_H))
    for k in INPUT_KEYS + tuple(k for k in INPUT_KEYS_H if k in x):
        iv = x[k]
        if not isinstance(iv, list) or len(iv) != 2:
            raise _Bad(f"{path}.{k}", "must be a [lo, hi] pair")
        for j in (0, 1):
            _numstr(iv[j], f"{path}.{k}[{j}]")


def _semantics(p):
    """Every loader rule of §3 beyond the schema; raises _Bad(kind="semantic"|"range")."""
    def num(s, path):
        return parse(s, path)

    def bad(path, msg):
        raise _Bad(path, msg, "semantic")

    # numbers: every number field in the plan number range
    for k in ("eps", "c"):
        num(p[k], f"$.{k}")
    if p["eps_target"] is not None:
        num(p["eps_target"], "$.eps_target")
    for k in ("avg_bits", "compression_vs_fp16", "cache_bits_at_max_seq_len"):
        num(p["claims"][k], f"$.claims.{k}")
    for k in ("layer_bounds", "attention_error_max"):
        for i, x in enumerate(p["claims"][k]):
            if x is not None:
                num(x, f"$.claims.{k}[{i}]")
    for k in ("end_to_end_bound", "logit_bound", "kl_bound"):
        if p["claims"][k] is not None:
            num(p["claims"][k], f"$.claims.{k}")
    if p["max_kl"] is not None and num(p["max_kl"], "$.max_kl") <= 0:
        bad("$.max_kl", "must be > 0")
    comp = p["composition"]
    suffix = comp["form"] == "suffix"
    for ck in ("remainder", "logit_gain"):
        if (comp[ck] is not None) != suffix:
            bad(f"$.composition.{ck}", "present iff the form is suffix")
        if comp[ck] is not None:
            meas, marg, val = (num(comp[ck][k], f"$.composition.{ck}.{k}") for k in ("measured", "margin", "value"))
            if marg < 1:
                bad(f"$.composition.{ck}.margin", "margin < 1")
            if val < meas * marg:
                bad(f"$.composition.{ck}.value", "value < measured x margin")
            if ck == "remainder":
                num(comp[ck]["radius"], "$.composition.remainder.radius")
    for name, spec in p["formats"].items():
        num(spec["bits_per_element"], f"$.formats.{name}.bits_per_element")
        num(spec["u"], f"$.formats.{name}.u")
    # formats: each entry is its format's definition
    for name, spec in p["formats"].items():
        ref = format_def(name)["entry"]
        if spec != ref:
            diff = sorted(k for k in ref if spec.get(k) != ref[k])
            bad(f"$.formats.{name}", f"fields {diff} differ from the format's definition")
    shape = p["shape"]
    for name in p["formats"]:               # every format of the plan can run on this model
        f = format_def(name)
        if f["kind"] == "ggml":
            if shape["head_dim"] % 32:
                bad(f"$.formats.{name}", f"blocks of 32 channels need 32 | head_dim {shape['head_dim']}")
        elif f["gran"] == "token" and f["group"] != shape["head_dim"]:
            bad(f"$.formats.{name}", f"per-token group {f['group']} is not head_dim {shape['head_dim']}")
        if f.get("rot") and shape["head_dim"] & (shape["head_dim"] - 1):
            bad(f"$.formats.{name}", "a Hadamard rotation needs a power-of-two head_dim")
        if f["gran"] == "channel" and p["analysis"]["channel_group"] % f["group"]:
            bad(f"$.formats.{name}", f"channel group {f['group']} does not divide analysis.channel_group")
    if shape["query_heads"] % shape["kv_heads"]:
        bad("$.shape", "query_heads is not a multiple of kv_heads")
    t = p["max_seq_len"]
    d = shape["head_dim"]
    cg = p["analysis"]["channel_group"]
    if len(p["layers"]) != shape["layers"]:
        bad("$.layers", "number of layers differs from shape.layers")
    if num(p["eps"], "$.eps") <= 0:
        bad("$.eps", "must be > 0")
    if num(p["c"], "$.c") <= 0:
        bad("$.c", "must be > 0")
    if p["eps_target"] is not None and num(p["eps_target"], "$.eps_target") <= 0:
        bad("$.eps_target", "must be > 0")
    if p["mode"]["kind"] == "eps" and p["eps_source"] != "user":
        bad("$.eps_source", "mode eps needs eps_source user")
    for k in ("layer_bounds", "attention_error_max"):
        if len(p["claims"][k]) != shape["layers"] or len(p["claims"][k]) != len(p["layers"]):
            bad(f"$.claims.{k}", "length differs from the number of layers")
    rs, rr = p["rule"]["sink"], p["rule"]["recent"]
    for li, la in enumerate(p["layers"]):
        lp = f"$.layers[{li}]"
        if la["layer"] != li:
            bad(f"{lp}.layer", "layers missing or out of order")
        if num(la["tau"], f"{lp}.tau") <= 0:
            bad(f"{lp}.tau", "must be > 0")
        if (la["suffix"] is not None) != suffix:
            bad(f"{lp}.suffix", "present iff the composition form is suffix")
        for lk in LIP_KEYS + (("suffix",) if la["suffix"] is not None else ()):
            lip = la[lk]
            meas, marg, val = (num(lip[k], f"{lp}.{lk}.{k}") for k in ("measured", "margin", "value"))
            if marg < 1:
                bad(f"{lp}.{lk}.margin", "margin < 1")
            if val < meas * marg:
                bad(f"{lp}.{lk}.value", "value < measured x margin")
        if len(la["heads"]) != shape["kv_heads"]:
            bad(f"{lp}.heads", "number of heads differs from shape.kv_heads")
        for hi, h in enumerate(la["heads"]):
            hp = f"{lp}.heads[{hi}]"
            if h["kv_head"] != hi:
                bad(f"{hp}.kv_head", "heads missing or out of order")
            if num(h["o_proj_norm"], f"{hp}.o_proj_norm") <= 0:
                bad(f"{hp}.o_proj_norm", "must be > 0")
            qmax = num(h["q_max"], f"{hp}.q_max")
            for kv in ("K", "V"):
                rp = f"{hp}.{kv}"
                rule = h[kv]
                s, r = rule["sink"]["length"], rule["recent"]["length"]
                if (s, r) != (h["K"]["sink"]["length"], h["K"]["recent"]["length"]):
                    bad(rp, "K and V rules have different sink or recent lengths")
                if (s, r) != (rs, rr):
                    bad(rp, "sink/recent lengths differ from $.rule")
                if s + r > t:
                    bad(rp, "sink + recent > max_seq_len")
                rest_len = t - s - r
                if "length" in rule["rest"] and rule["rest"]["length"] != rest_len:
                    bad(f"{rp}.rest.length", f"must be max_seq_len - sink - recent = {rest_len}")
                lens = {"sink": s, "recent": r, "rest": rest_len}
                for seg in ("sink", "recent", "rest"):
                    item = rule[seg]
                    sp = f"{rp}.{seg}"
                    if item["format"] not in p["formats"]:
                        bad(f"{sp}.format", "not in $.formats")
                    f = format_def(item["format"])
                    if lens[seg] > 0 and item["inputs"] is None:
                        bad(f"{sp}.inputs", "a non-empty segment needs its inputs")
                    if lens[seg] > 0 and f["gran"] == "channel" and seg != "rest":
                        bad(f"{sp}.format", f"a channel-grouped format in a non-empty {seg} (the cache writes it "
                                            "one token at a time)")
                    if item["inputs"] is not None:
                        _interval_rules(item["inputs"], f"{sp}.inputs", num, bad)
                        if qmax < num(item["inputs"]["qnorm"][1], f"{sp}.inputs.qnorm[1]"):
                            bad(f"{hp}.q_max", f"below {sp}.inputs.qnorm's upper end")
                prev = -1
                for bi, b in enumerate(rule["blocks"]):
                    bp = f"{rp}.blocks[{bi}]"
                    if not b["start"] < b["end"] <= t:
                        bad(bp, "needs start < end <= max_seq_len")
                    if b["start"] < prev:
                        bad(bp, "blocks overlap or are unsorted")
                    prev = max(prev, b["end"])
                    if b["format"] not in p["formats"]:
                        bad(f"{bp}.format", "not in $.formats")
                    if format_def(b["format"])["gran"] == "channel":
                        bad(f"{bp}.format", "a channel-grouped format in a block (the cache writes it one token at a "
                                            "time)")
                    _interval_rules(b["inputs"], f"{bp}.inputs", num, bad)


def _interval_rules(inputs, path, num, bad):
    for k in INPUT_KEYS + tuple(k for k in INPUT_KEYS_H if k in inputs):
        lo, hi = num(inputs[k][0], f"{path}.{k}[0]"), num(inputs[k][1], f"{path}.{k}[1]")
        if lo > hi:
            bad(f"{path}.{k}", "lo > hi")


def validate(plan) -> tuple:
    """(True, None, None) or (False, "path: reason", kind) with kind in schema | semantic | range."""
    try:
        _schema(plan)
        _semantics(plan)
    except _Bad as e:
        return False, str(e), e.kind
    except RecursionError:
        return False, "$: nested too deeply", "schema"
    return True, None, None


# ============================================================================ run-time simulation (§4)
# A chain is the tuple of the segments whose formats a value passed through, in order:
# ("sink",), ("recent",), ("recent", "rest"), ("rest",) or () (exact). A key (reader, chain) is a
# stored form as read: the reader is the segment whose inputs describe the query (sink for t < S,
# recent at distance < R, rest at distance >= R).
STATE_OF = {("sink", ("sink",)): "sink", ("recent", ("recent",)): "recent", ("rest", ("recent",)): "recent-far",
            ("rest", ()): "recent-far", ("rest", ("recent", "rest")): "rest", ("rest", ("rest",)): "rest"}
READER = {"sink": "sink", "recent": "recent", "recent-far": "rest", "rest": "rest"}


class _Cache:
    """One stream's cache as runs [lo, hi, status, chain] (status: sink, recent, raw, pending, rest).

    What it does is what §4 says the cache does, as operations: a chunk's positions are written once
    (sink format below S; recent format, or raw (exact) when R = 0); before a chunk's queries read,
    every position t >= S with a - t >= R for the oldest query a leaves the window: re-quantized to a
    per-token rest format at once, or, for a channel-grouped rest format, kept (its FP32 copy) until
    every position of its group — [max(S, gG), (g+1)G), absolute alignment — has left, then the whole
    group is quantized."""

    def __init__(self, s, r, g):
        self.s, self.r, self.g = s, r, g
        self.runs = []            # sorted, disjoint, covering [0, length)
        self.length = 0
        self.oldest = 0           # the query the last layout was made for

    def _split(self, x):
        out = []
        for lo, hi, st, ch in self.runs:
            if lo < x < hi:
                out += [[lo, x, st, ch], [x, hi, st, ch]]
            else:
                out.append([lo, hi, st, ch])
        self.runs = out

    def _merge(self):
        out = []
        for run in self.runs:
            if out and out[-1][1] == run[0] and out[-1][2] == run[2] and out[-1][3] == run[3]:
                out[-1][1] = run[1]
            else:
                out.append(list(run))
        self.runs = out

    def write(self, a, b):
        assert a == self.length
        s = self.s
        if a < min(b, s):
            self.runs.append([a, min(b, s), "sink", ("sink",)])
        lo = max(a, s)
        if lo < b:
            self.runs.append([lo, b, "recent", ("recent",)] if self.r > 0 else [lo, b, "raw", ()])
        self.length = b
        self._merge()

    def layout(self, a):
        self.oldest = a
        cut = a - self.r + 1                  # positions t < cut (t < a) have a - t >= R
        cut = min(cut, a)
        self._split(cut)
        self._split(self.s)
        for run in self.runs:
            lo, hi, st, ch = run
            if hi <= cut and lo >= self.s and st in ("recent", "raw"):
                if self.g is None:
                    run[2], run[3] = "rest", ch + ("rest",)
                else:
                    run[2] = "pending"
        if self.g is not None:
            still = [lo for lo, hi, st, ch in self.runs if st in ("recent", "raw") and lo >= self.s]
            left_end = min(still) if still else self.length
            done = (left_end // self.g) * self.g    # groups [max(S, gG), (g+1)G) with (g+1)G <= left_end
            self._split(done)
            for run in self.runs:
                if run[2] == "pending" and run[1] <= done:
                    run[2], run[3] = "rest", run[3] + ("rest",)
        self._merge()

    def can_crop(self, k, rule="doc"):
        """§4: "crop(k) is allowed only for k >= the oldest query the current layout was made for"
        (rule "doc"); the cache (hnfverify/kv/cache.py) implements the same rule (rule "cache"). The old
        wording ("while every position >= k is still recent") allowed k down to a - R + 1, after which a
        query read rest-format positions at distance < R: the test below keeps that schedule in view."""
        return k >= self.oldest

    def crop(self, k):
        self._split(k)
        self.runs = [run for run in self.runs if run[1] <= k]
        self.length = k


def _add(acc, key, lo, hi):
    if hi > lo:
        acc.setdefault(key, []).append((lo, hi))


def _union(ivs):
    out = []
    for lo, hi in sorted(ivs):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [tuple(x) for x in out]


def _read(cache, a, b, acc):
    """The queries a .. b-1 of chunk [a, b) read every t < a; record (reader, chain) -> positions."""
    s, r = cache.s, cache.r
    for lo, hi, st, ch in cache.runs:
        hi = min(hi, a)
        if lo >= hi:
            continue
        if st == "sink" or hi <= s:
            _add(acc, ("sink", ch), lo, hi)
            continue
        lo = max(lo, s)
        _add(acc, ("recent", ch), max(lo, a - r + 1), hi)     # some query at distance < R: the oldest
        _add(acc, ("rest", ch), lo, min(hi, b - r))          # some query at distance >= R: the newest


def _prefills(s, r, g, t):
    if t <= SIM_FULL_T:
        return list(range(1, t + 1))
    gg = g or 1
    pts = set(range(1, min(t, 3 * gg + 8) + 1))
    for base in (s, s + r, t):
        for k in range(-2 * gg - 3, 2 * gg + 4):
            pts.add(base + k)
    for m in range(max(1, (s + r) // gg - 2), (s + r) // gg + 4):
        for k in (-1, 0, 1):
            pts.add(m * gg + k)
    return sorted(p for p in pts if 1 <= p <= t)


PATTERNS = ((1,), (2,), (3,), (4,), (1, 2), (3, 1), (4, 2, 1), (2, 4))


def simulate(s, r, g, t, crop=False, max_after=None):
    """Union over chunked update schedules of what the queries < t read: {(reader, chain): intervals}.

    Schedules: a prefill of every length p (all p when t <= 96; for longer sequences p near 0, S, S+R,
    t and the group boundaries around S+R), then chunks of 1, 2, 3, 4 tokens or mixed cycles; with
    ``crop`` ("doc" or "cache": whose crop rule), also: decode, crop(k) back to any k that rule
    allows, decode on."""
    acc = {}
    far = t <= SIM_FULL_T
    limit = max_after if max_after is not None else (None if far else 4 * (g or 1) + 2 * min(r, 64) + 16)
    for p in _prefills(s, r, g, t):
        for pat in PATTERNS:
            c = _Cache(s, r, g)
            c.write(0, p)
            c.layout(p - 1)
            a, i, n = p, 0, 0
            while a < t and (limit is None or n < limit):
                b = min(t, a + pat[i % len(pat)])
                c.layout(a)
                _read(c, a, b, acc)
                c.write(a, b)
                a, i, n = b, i + 1, n + 1
            if crop and pat == (1,) and len(_prefills(s, r, g, t)) < 200:
                _crop_runs(s, r, g, t, p, acc, crop)
    return {k: _union(v) for k, v in acc.items()}


def _crop_runs(s, r, g, t, p, acc, rule):
    """Decode from a prefill p to every q < t, crop back to every allowed k < q, decode on a few steps."""
    for q in range(p, min(t, p + max(r, 1) + 2 * (g or 1) + 4)):
        base = _Cache(s, r, g)
        base.write(0, p)
        base.layout(p - 1)
        a = p
        while a < q:
            base.layout(a)
            base.write(a, a + 1)
            a += 1
        for k in range(max(1, q - r - 1), q + 1):
            if not base.can_crop(k, rule):
                continue
            c = _Cache(s, r, g)
            c.runs, c.length, c.oldest = [list(x) for x in base.runs], base.length, base.oldest
            c.crop(k)
            a = k
            for _ in range(r + 2):
                if a >= t:
                    break
                c.layout(a)
                _read(c, a, a + 1, acc)
                c.write(a, a + 1)
                a += 1


def doc_reachable(s, r, g, t) -> dict:
    """§4's list of reachable states for max_seq_len t: {state: (lo, hi)} (chains non-empty)."""
    s = min(s, t)
    out = {}
    if s > 0:
        out["sink"] = (0, s)
    if r >= 2 and t - 1 > s:
        out["recent"] = (s, t - 1)
    if r >= 1 and t - r > s:
        out["recent-far"] = (s, t - r)
    a = t - 1
    rs = max(s, a - r + 1) if r >= 1 else a
    rest_end = rs if g is None else max(s, g * (rs // g))
    if rest_end > s:
        out["rest"] = (s, rest_end)
    return out


_SIM_CACHE: dict = {}


def stream_states(s, r, g, t, crop=False) -> dict:
    """{state name: {"chain": chain, "reader": segment, "positions": intervals, "doc": bool, "sim": bool}}
    plus "findings": differences between the simulation and §4's list."""
    key = (s, r, g, t, crop)
    if key in _SIM_CACHE:
        return _SIM_CACHE[key]
    sim = simulate(s, r, g, t, crop)
    if t > SIM_FULL_T:          # sampled prefills: a state's positions are the hull of those it is read at
        sim = {k: [(v[0][0], v[-1][1])] for k, v in sim.items()}
    doc = doc_reachable(s, r, g, t)
    states, findings = {}, []
    for (reader, chain), ivs in sim.items():
        name = STATE_OF.get((reader, chain))
        if name is None:
            name = f"{reader}-reads-{'+'.join(chain) or 'exact'}"
        if not chain:
            continue                               # read exactly: nothing to check, error 0
        st = states.setdefault(name, {"chain": chain, "reader": reader, "positions": [], "doc": False, "sim": True})
        st["positions"] = _union(st["positions"] + ivs)
    for name, (lo, hi) in doc.items():
        if name in states:
            states[name]["doc"] = True
            sim_iv = states[name]["positions"]
            outside = [iv for iv in sim_iv if iv[0] < lo or iv[1] > hi]
            if outside:
                findings.append(f"S={s} R={r} G={g} T={t}: state {name} read at positions {outside}, outside "
                                f"§4's [{lo}, {hi})")
        else:
            chain = {"sink": ("sink",), "recent": ("recent",), "recent-far": ("recent",),
                     "rest": ("recent", "rest") if r > 0 else ("rest",)}[name]
            states[name] = {"chain": chain, "reader": READER[name], "positions": [(lo, hi)], "doc": True,
                            "sim": False}
            findings.append(f"S={s} R={r} G={g} T={t}: §4 lists {name} on [{lo}, {hi}) but no schedule reads it "
                            "(conservative)")
    for name, st in states.items():
        if st["sim"] and not st["doc"]:
            findings.append(f"S={s} R={r} G={g} T={t}: SOUNDNESS: a query reads {name} (chain {st['chain']}, "
                            f"{st['reader']} inputs) at positions {st['positions']}; §4's list misses it")
    out = {"states": states, "findings": findings}
    if len(_SIM_CACHE) > 4096:
        _SIM_CACHE.clear()
    _SIM_CACHE[key] = out
    return out


# ============================================================================ decisions (§5)
class Ob:
    __slots__ = ("id", "family", "holds", "sim", "doc", "detail")

    def __init__(self, oid, family, holds, sim=True, doc=True, detail=None):
        self.id, self.family, self.holds, self.sim, self.doc = oid, family, holds, sim, doc
        self.detail = detail or {}

    def __repr__(self):
        return f"Ob({self.id}, {self.holds}, sim={self.sim}, doc={self.doc})"


class Result:
    def __init__(self):
        self.valid, self.reason, self.kind = True, None, None
        self.obligations: dict = {}
        self.findings: list = []
        self.sound = self.doc = "INVALID"
        self.values: dict = {}

    def failing(self, which="sim"):
        """Obligations that are false: ``which`` "sim" (what the cache reaches) or "doc" (§4's list)."""
        return [o for o in self.obligations.values() if getattr(o, which) and o.holds is False]

    def undecided(self, which="sim"):
        return [o for o in self.obligations.values() if getattr(o, which) and o.holds is None]

    def summary(self) -> str:
        if not self.valid:
            return f"INVALID ({self.reason})"
        bad = self.failing("sim") or self.failing("doc")
        return f"sound {self.sound}, doc {self.doc}" + (f"; false: {[o.id for o in bad][:5]}" if bad else "")


def _verdict(obs, which):
    sel = [o for o in obs if getattr(o, which)]
    if any(o.holds is False for o in sel):
        return "REFUTED"
    if any(o.holds is None for o in sel) or not sel:
        return "UNDECIDABLE"
    return "PROVED"


def _minus(ivs, blocks):
    out = []
    for lo, hi in ivs:
        cur = lo
        for bs, be in blocks:
            if be <= cur or bs >= hi:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
        if cur < hi:
            out.append((cur, hi))
    return out


def _rng(inputs):
    """d_token, d_channel, amax, and the rotated d_token_h, amax_h (None where absent)."""
    return (parse(inputs["d_token"][1]), parse(inputs["d_channel"][1]), parse(inputs["amax"][1]),
            *(parse(inputs[k][1]) if k in inputs else None for k in INPUT_KEYS_H))


def decide(plan, crop=False) -> Result:
    """Decide a parsed plan. ``crop`` ("doc": §4's crop rule, "cache": the cache's): also simulate
    schedules that crop, so that the states crop reaches count as reachable.

    Two bounds per head: "doc" is §2.4's E_h (segment errors over every state whose reader is the
    segment, reachable or not); "sim" takes only the stored forms the simulated cache makes a query
    read (a smaller bound, still sound), so that a state §4's list misses shows up in "sim"."""
    res = Result()
    ok, reason, kind = validate(plan)
    if not ok:
        res.valid, res.reason, res.kind = False, reason, kind
        return res
    t, d = plan["max_seq_len"], plan["shape"]["head_dim"]
    eps, c = R.of(parse(plan["eps"])), parse(plan["c"])
    fmts = {n: format_def(n) for n in plan["formats"]}
    g_q = plan["shape"]["query_heads"] // plan["shape"]["kv_heads"]
    obs = res.obligations
    e_heads, b_layers = {}, []
    for la in plan["layers"]:
        li = la["layer"]
        tau = parse(la["tau"])
        b_sum = {"sim": R.of(0), "doc": R.of(0)}
        e_max = None
        for h in la["heads"]:
            hid = h["kv_head"]
            qmax = parse(h["q_max"])
            s, r = h["K"]["sink"]["length"], h["K"]["recent"]["length"]
            lens = {"sink": s, "recent": r, "rest": t - s - r}
            errs = {"K": {}, "V": {}}                 # kv -> which ("sim"/"doc") -> seg -> R
            for kv in ("K", "V"):
                rule = h[kv]
                rest_f = fmts[rule["rest"]["format"]]
                g = rest_f["group"] if rest_f["gran"] == "channel" else None
                info = stream_states(s, r, g, t, crop)
                for fnd in info["findings"]:
                    if fnd not in res.findings:
                        res.findings.append(fnd)
                blocks = [(b["start"], b["end"]) for b in rule["blocks"]]
                per = {"sim": {}, "doc": {}}

                def acc(which, seg, err, per=per):
                    cur = per[which].get(seg)
                    per[which][seg] = err if cur is None else rmax(cur, err)
                for name, st in info["states"].items():
                    pos = _minus(st["positions"], blocks)
                    if not pos:
                        continue
                    reader = st["reader"]
                    inp = rule[reader]["inputs"]
                    if inp is None:                    # a reader segment of length 0 cannot be read
                        res.findings.append(f"L{li} H{hid} {kv}: state {name} read with {reader} inputs, "
                                            "which the plan leaves null")
                        continue
                    rg = _rng(inp)
                    kap = parse(inp["kappa"][1]) if kv == "K" else Q(0)
                    cv = chain_value([fmts[rule[x]["format"]] for x in st["chain"]], *rg, d, kap)
                    rhs = (c * kap) * cv["sum_uD2"]
                    if len(st["chain"]) > 1:
                        rhs = rhs.inexact()
                    th = le(rhs, eps)
                    holds = (False if cv["domain"] is False or th is False else
                             None if cv["domain"] is None or th is None else True)
                    oid = f"precision/L{li}/H{hid}/{kv}/{name}"
                    obs[oid] = Ob(oid, "precision-lower-bound", holds, sim=st["sim"], doc=st["doc"],
                                  detail={"rhs": rhs, "chain": cv, "reader": reader, "positions": pos,
                                          "kappa": kap, "domain": cv["domain"]})
                    if st["sim"]:
                        acc("sim", reader, cv["error"])
                # §2.4: dK_sigma, dV_sigma over *every* state whose reader is sigma, reachable or not (and
                # whatever the blocks override); "sim" above keeps only the forms a query really reads
                rest_chains = [("recent",), ("recent", "rest")] if r > 0 else [("rest",)]
                for seg, chains in (("sink", [("sink",)]), ("recent", [("recent",)]), ("rest", rest_chains)):
                    if lens[seg] <= 0 or rule[seg]["inputs"] is None:
                        continue
                    rg = _rng(rule[seg]["inputs"])
                    for ch in chains:
                        acc("doc", seg, chain_value([fmts[rule[x]["format"]] for x in ch], *rg, d, 0)["error"])
                for bi, b in enumerate(rule["blocks"]):
                    rg = _rng(b["inputs"])
                    kap = parse(b["inputs"]["kappa"][1]) if kv == "K" else Q(0)
                    cv = chain_value([fmts[b["format"]]], *rg, d, kap)
                    rhs = (c * kap) * cv["sum_uD2"]
                    th = le(rhs, eps)
                    holds = (False if cv["domain"] is False or th is False else
                             None if cv["domain"] is None or th is None else True)
                    oid = f"precision/L{li}/H{hid}/{kv}/block{bi}"
                    obs[oid] = Ob(oid, "precision-lower-bound", holds,
                                  detail={"rhs": rhs, "chain": cv, "reader": f"block{bi}", "kappa": kap,
                                          "domain": cv["domain"]})
                    for seg in ("sink", "recent", "rest"):
                        if lens[seg] and (b["start"] < s if seg == "sink" else b["end"] > s):
                            acc("sim", seg, cv["error"])
                            acc("doc", seg, cv["error"])
                errs[kv] = per
            eh = {}
            for which in ("sim", "doc"):
                eh[which] = _head_error(h, tau, qmax, lens, errs["K"][which], errs["V"][which])
            e_heads[(li, hid)] = eh
            if plan["eps_source"] == "user":
                oid = f"attention/L{li}/H{hid}"
                hs, hd = le(eh["sim"], eps), le(eh["doc"], eps)
                if hs == hd:
                    obs[oid] = Ob(oid, "attention-error-budget", hs, detail={"E": eh["doc"], "E_sim": eh["sim"]})
                else:
                    obs[oid] = Ob(oid, "attention-error-budget", hs, doc=False, detail={"E": eh["sim"]})
                    obs[oid + "#doc"] = Ob(oid, "attention-error-budget", hd, sim=False, detail={"E": eh["doc"]})
            o = R.of(parse(h["o_proj_norm"]))
            term = {w: (o * rsqrt(Q(g_q))) * eh[w] for w in eh}
            b_sum = {w: b_sum[w] + term[w] for w in term}
            e_max = {w: eh[w] if e_max is None else rmax(e_max[w], eh[w]) for w in eh}
        b_layers.append((b_sum, e_max))
    # composition (§2.5): e_L = sqrt(T) sum_l (prod_{j>l} L_j) L'_l b_l
    lips = [parse(la["lipschitz"]["value"]) for la in plan["layers"]]
    mlps = [parse(la["mlp_lipschitz"]["value"]) for la in plan["layers"]]
    e_l = {}
    for w in ("sim", "doc"):
        tot = R.of(0)
        for li in range(len(plan["layers"])):
            amp = Q(1)
            for j in range(li + 1, len(plan["layers"])):
                amp *= lips[j]
            tot = tot + (R.of(amp * mlps[li]) * b_layers[li][0][w])
        e_l[w] = (rsqrt(Q(t)) * tot).inexact()
    comp = plan["composition"]
    never = R(Q(10) ** 400, None)               # no bound at all: every "<= target" is False
    z_osc, kl = {"sim": never, "doc": never}, {"sim": never, "doc": never}
    if comp["form"] == "suffix":                # §2.5 suffix form and §2.6
        sfx = [parse(la["suffix"]["value"]) for la in plan["layers"]]
        k_rem, rho = parse(comp["remainder"]["value"]), parse(comp["remainder"]["radius"])
        gain = parse(comp["logit_gain"]["value"])
        for w in ("sim", "doc"):
            eps_l = [rsqrt(Q(t)) * b_layers[li][0][w] for li in range(len(plan["layers"]))]
            ss = R.of(0)
            for e in eps_l:
                ss = ss + e * e
            inside = le(ss.inexact(), R.of(rho * rho))
            if inside is False:
                e_l[w] = never
            elif inside is None:
                e_l[w] = R(0, None, False)             # undecidable by oracle
            else:
                tot = R.of(0)
                for s_l, e in zip(sfx, eps_l):
                    tot = tot + R.of(s_l) * e
                e_l[w] = (tot + R.of(k_rem / 2) * ss).inexact()
            if e_l[w] is not never and e_l[w].hi is not None:
                z_osc[w] = R.of(gain) * e_l[w]
                kl[w] = (z_osc[w] * z_osc[w] * R.of(Q(1, 8))).inexact()
            elif e_l[w] is not never:
                z_osc[w] = kl[w] = R(0, None, False)
    res.values = {"E": e_heads, "b": [x[0] for x in b_layers], "E_max": [x[1] for x in b_layers], "e_L": e_l,
                  "Z": z_osc, "KL": kl}
    if plan["max_kl"] is not None:
        mk = R.of(parse(plan["max_kl"]))
        hs, hd = le(kl["sim"], mk), le(kl["doc"], mk)
        obs["kl"] = Ob("kl", "kl-budget", hs, doc=(hs == hd), detail={"KL": kl["doc"], "Z": z_osc["doc"]})
        if hs != hd:
            obs["kl#doc"] = Ob("kl", "kl-budget", hd, sim=False, detail={"KL": kl["doc"], "Z": z_osc["doc"]})
    if plan["eps_target"] is not None:
        tgt = R.of(parse(plan["eps_target"]))
        hs, hd = le(e_l["sim"], tgt), le(e_l["doc"], tgt)
        obs["composition"] = Ob("composition", "composition-law", hs, doc=(hs == hd), detail={"e_L": e_l["doc"]})
        if hs != hd:
            obs["composition#doc"] = Ob("composition", "composition-law", hd, sim=False, detail={"e_L": e_l["doc"]})
    # claims (§5.5): claimed bounds >= the recomputed ones; null always holds
    cl = plan["claims"]
    for w in ("sim", "doc"):
        verdicts, why = [], []
        for li in range(len(plan["layers"])):
            for key, val in (("layer_bounds", b_layers[li][0][w]), ("attention_error_max", b_layers[li][1][w])):
                x = cl[key][li]
                if x is not None:
                    v = le(val.inexact(), R.of(parse(x)))
                    verdicts.append(v)
                    if v is not True:
                        why.append(f"{key}[{li}] {x} vs {val.approx():.9g}")
        for key, val in (("end_to_end_bound", e_l[w]), ("logit_bound", z_osc[w]), ("kl_bound", kl[w])):
            if cl[key] is not None:
                v = le(val, R.of(parse(cl[key])))
                verdicts.append(v)
                if v is not True:
                    why.append(f"{key} {cl[key]} vs {val.approx():.9g}")
        holds = False if False in verdicts else None if None in verdicts else True
        if w == "sim":
            obs["claims"] = Ob("claims", "claims", holds, detail={"why": why})
            sim_claims = holds
        elif holds != sim_claims:
            obs["claims"].doc = False
            obs["claims#doc"] = Ob("claims", "claims", holds, sim=False, detail={"why": why})
    allobs = list(obs.values())
    res.sound, res.doc = _verdict(allobs, "sim"), _verdict(allobs, "doc")
    return res


def rmin(a: R, b: R) -> R:
    lo = min(a.lo, b.lo)
    hi = a.hi if b.hi is None else b.hi if a.hi is None else min(a.hi, b.hi)
    return R(lo, hi, a.exact and b.exact and (a.lo == b.lo or hi == lo))


def _tanh_half(x: R) -> R:
    """tanh(x/2) = 1 - 2/(e^x + 1), and at most x/2; 1 above the exponent cap 128 (§2.4)."""
    if x.lo > 128:
        return R.of(1)
    e = rexp(x)
    lo = 1 - 2 / (e.lo + 1)
    hi = Q(1) if e.hi is None else 1 - 2 / (e.hi + 1)
    half = R(x.lo / 2, None if x.hi is None else x.hi / 2, x.exact)
    return rmin(R(lo, hi, e.exact), half)


def _head_error(h, tau, qmax, lens, dk, dv) -> R:
    """E_h (§2.4) over the segments a query reads (those of non-zero length), with dK/dV the largest
    errors of the stored forms read as each segment (0 when every such form is exact):
    min(max dV, sum min(1, e^(m+M) A) dV) + min(sum (e^(m+M) - 1) B, 2 tanh(M/2) max W)."""
    segs = [s for s in ("sink", "recent", "rest") if lens[s] > 0]
    zero = R.of(0)
    if not segs:
        return zero
    m = {s: (R.of(tau * qmax)) * dk.get(s, zero) for s in segs}
    big = rmax(*m.values())

    def inp(s, key):
        return R.of(max(parse(h["K"][s]["inputs"][key][1]), parse(h["V"][s]["inputs"][key][1])))

    first, order1, capped = zero, zero, False
    for s in segs:
        x = m[s] + big
        if x.lo > 128:
            capped, share = True, R.of(1)
        else:
            share = rmin(R.of(1), rexp(x) * inp(s, "mass_alpha"))
            order1 = order1 + rexp(x).minus_one() * inp(s, "mass_avo")
        first = first + share * dv.get(s, zero)
    first = rmin(first, rmax(*(dv.get(s, zero) for s in segs)))
    tv = R.of(2) * _tanh_half(big) * rmax(*(inp(s, "vo") for s in segs))
    second = tv if capped else rmin(order1, tv)
    return (first + second).inexact()


# ============================================================================ certificates (§6)
def check_certificate(cert, plan, res: Result | None = None) -> list:
    """Why a certificate is wrong by the oracle (empty: nothing wrong it can see): its plan invalid, a
    confirmed obligation false, an implied obligation missing or not PROVED, a witness number that
    contradicts the plan (eps, c, kappa, a right-hand side or bound below the true value), assumptions
    that are not the plan's verbatim, SMT text missing from a PROVED key obligation."""
    res = res or decide(plan)
    out = []
    if not res.valid:
        return [f"the plan is invalid: {res.reason}"]
    if not isinstance(cert, dict):
        return ["not an object"]
    got = {}
    for o in cert.get("obligations", []) if isinstance(cert.get("obligations"), list) else []:
        if isinstance(o, dict) and isinstance(o.get("id"), str):
            if o["id"] in got:
                out.append(f"{o['id']} appears twice")
            got[o["id"]] = o
    if cert.get("verdict") != "PROVED":
        out.append(f"verdict {cert.get('verdict')!r}")
    for oid, ob in res.obligations.items():
        if oid.endswith("#doc"):
            continue
        if not (ob.sim or ob.doc):
            continue
        o = got.get(oid)
        if o is None:
            out.append(f"{oid} ({ob.family}) is missing")
            continue
        if o.get("verdict") != "PROVED":
            out.append(f"{oid} is {o.get('verdict')!r}, not PROVED")
        if ob.holds is False:
            out.append(f"{oid} is confirmed but false by the oracle")
        out += _witness_problems(oid, ob, o.get("witness"), plan)
    gate = cert.get("gate") if isinstance(cert.get("gate"), dict) else {}
    if gate.get("max_kl") is not None:                  # check --max-kl: the gate's own KL budget (§5)
        o = got.get("kl/gate")
        if o is None:
            out.append("kl/gate (check --max-kl) is missing")
        else:
            v = le(res.values["KL"]["sim"], R.of(parse(gate["max_kl"])))
            if v is False:
                out.append("kl/gate is confirmed but false by the oracle")
            out += _not_below("kl/gate", "kl_bound", _wnum(o.get("witness"), "kl_bound"), res.values["KL"]["doc"])
            if "smt2" not in o:
                out.append("kl/gate without its SMT query")
    for oid, o in got.items():
        if oid == "kl/gate" and gate.get("max_kl") is not None:
            continue
        if oid not in res.obligations and oid != "lemma/monotonicity" and \
                o.get("family") != "precision-lower-bound-position":     # §5: --smt-per-position audits
            out.append(f"{oid} is not an obligation the plan implies")
    # §5: the lemma is an obligation; keys that hold and the composition law carry their SMT-LIB2 query
    if "lemma/monotonicity" not in got or "smt2" not in got["lemma/monotonicity"]:
        out.append("lemma/monotonicity (with its SMT query) is missing")
    for oid, ob in res.obligations.items():
        if ob.family == "precision-lower-bound" and "/K/" in oid and oid in got and "smt2" not in got[oid]:
            out.append(f"{oid}: a PROVED key obligation without its SMT query")
    for oid in ("composition", "kl"):
        if oid in got and "smt2" not in got[oid]:
            out.append(f"{oid} without its SMT query")
    asm = cert.get("assumptions")
    if not isinstance(asm, dict) or asm.get("measured") != plan.get("assumptions"):
        out.append("assumptions are not the plan's verbatim")
    return out


def _wnum(w, k):
    v = w.get(k) if isinstance(w, dict) else None
    if isinstance(v, str) and is_num(v):
        try:
            return Q(v)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _witness_problems(oid, ob, w, plan) -> list:
    out = []
    if not isinstance(w, dict):
        return [f"{oid}: no witness"]
    eps = parse(plan["eps"])
    if ob.family in ("precision-lower-bound", "attention-error-budget") and _wnum(w, "eps") not in (None, eps):
        out.append(f"{oid}: witness eps {w.get('eps')} is not the plan's {plan['eps']}")
    if ob.family == "precision-lower-bound":
        if _wnum(w, "c") not in (None, parse(plan["c"])):
            out.append(f"{oid}: witness c {w.get('c')} is not the plan's")
        if w.get("reader") is not None and w.get("reader") != ob.detail["reader"]:
            out.append(f"{oid}: witness reader {w.get('reader')!r} is not {ob.detail['reader']!r}")
        if _wnum(w, "kappa_hi") not in (None, ob.detail["kappa"]):
            out.append(f"{oid}: witness kappa_hi {w.get('kappa_hi')} != {canon(ob.detail['kappa'])}")
        out += _not_below(oid, "rhs", _wnum(w, "rhs"), ob.detail["rhs"])
        stages = w.get("stages")
        if isinstance(stages, list):
            chain = ob.detail["chain"]["stages"]
            if len(stages) != len(chain):
                out.append(f"{oid}: witness has {len(stages)} stages, the chain {len(chain)}")
            else:
                for k, (ws, cs) in enumerate(zip(stages, chain)):
                    if not isinstance(ws, dict) or ws.get("format") != cs["format"]:
                        out.append(f"{oid}: stage {k} format {ws.get('format') if isinstance(ws, dict) else ws!r}"
                                   f" != {cs['format']}")
                        continue
                    if _wnum(ws, "u") not in (None, cs["u"]):
                        out.append(f"{oid}: stage {k} u {ws.get('u')} != {canon(cs['u'])}")
                    out += _not_below(f"{oid} stage {k}", "D_hi", _wnum(ws, "D_hi"), cs["D"])
                    out += _not_below(f"{oid} stage {k}", "amax_hi", _wnum(ws, "amax_hi"), cs["amax"])
                    out += _not_below(f"{oid} stage {k}", "error", _wnum(ws, "error"), cs["error"])
        if w.get("format") is not None and ob.detail["chain"]["stages"] and \
                w.get("format") != ob.detail["chain"]["stages"][-1]["format"]:
            out.append(f"{oid}: witness format {w.get('format')} is not the chain's last stage")
    if ob.family == "attention-error-budget":
        out += _not_below(oid, "error_bound", _wnum(w, "error_bound"), ob.detail["E"])
    if ob.family == "composition-law":
        if plan["eps_target"] is not None and _wnum(w, "eps_target") not in (None, parse(plan["eps_target"])):
            out.append(f"{oid}: witness eps_target is not the plan's")
        out += _not_below(oid, "end_to_end_bound", _wnum(w, "end_to_end_bound"), ob.detail["e_L"])
    if ob.family == "kl-budget":
        if _wnum(w, "max_kl") not in (None, parse(plan["max_kl"])):
            out.append(f"{oid}: witness max_kl is not the plan's")
        out += _not_below(oid, "kl_bound", _wnum(w, "kl_bound"), ob.detail["KL"])
        out += _not_below(oid, "logit_bound", _wnum(w, "logit_bound"), ob.detail["Z"])
    return out


def _not_below(oid, key, got, true: R) -> list:
    """A witness bound must be an upper bound of the true value, and not a wild one (at most 1e-9
    relative above the oracle's interval, a generous allowance for 64-bit outward rounding)."""
    if got is None:
        return []
    if got < true.lo * (1 - BAND):
        return [f"{oid}: witness {key} {canon(got)[:40]} is below the true value {float(true.lo):.17g}"]
    if true.hi is not None and got > true.hi * (1 + Q(1, 10 ** 9)) + Q(1, 10 ** 250):
        return [f"{oid}: witness {key} {canon(got)[:40]} is far above the true value {float(true.hi):.17g}"]
    return []
