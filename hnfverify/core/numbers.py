"""Exact numbers for plans and bounds: parsing, canonical printing, outward rounding, sqrt and exp
upper bounds — all with ``fractions.Fraction``, no floats in any decision.

Number strings in plan files are decimals (``"0.001"``, ``"1.2345678E-5"``) or rationals
(``"1/30"``). NaN, Infinity and anything else are rejected.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from ..errors import InputError

# used with fullmatch: ``$`` would also match before a final newline, so "1\n" would pass
_DEC = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_RAT = re.compile(r"-?(0|[1-9][0-9]*)/[1-9][0-9]*")
NUMBER_PATTERN = r"^-?(0|[1-9][0-9]*)((\.[0-9]+)?([eE][-+]?[0-9]+)?|/[1-9][0-9]*)$"
MAX_EXPONENT = 400          # |exponent| beyond this is refused (keeps exact arithmetic bounded)
_HUGE = Fraction(10) ** 300     # magnitudes a plan may hold: every value then has a finite float image
_TINY = Fraction(1, 10 ** 300)


def parse_number(s, where: str = "value") -> Fraction:
    """A decimal or rational string -> Fraction. Raises InputError naming ``where``."""
    if isinstance(s, bool) or not isinstance(s, str):
        raise InputError(f"{where}: expected a number written as a string (decimal or p/q), got {s!r}")
    if len(s) > 2000:
        raise InputError(f"{where}: number string of {len(s)} characters is too long")
    if _DEC.fullmatch(s):
        m = re.search(r"[eE]([-+]?[0-9]+)\Z", s)
        if m and abs(int(m.group(1))) > MAX_EXPONENT:
            raise InputError(f"{where}: exponent {m.group(1)} is out of range (|e| <= {MAX_EXPONENT})")
        x = Fraction(s)
    elif _RAT.fullmatch(s):
        x = Fraction(s)
    else:
        raise InputError(f"{where}: {s!r} is not a finite decimal or rational number")
    if x != 0 and not (_TINY <= abs(x) <= _HUGE):
        raise InputError(f"{where}: {s[:40]!r} is out of range (|x| must lie in [1e-300, 1e300] or be 0)")
    return x


def fmt_number(x: Fraction | int) -> str:
    """Canonical string: integers plainly, finite decimals as Decimal strings, else p/q."""
    x = Fraction(x)
    if x.denominator == 1:
        n = x.numerator
        digits = str(abs(n))
        zeros = len(digits) - len(digits.rstrip("0"))
        if zeros >= 6:                              # large round integers: scientific, still exact
            sig = digits.rstrip("0")
            mant = sig[0] + ("." + sig[1:] if len(sig) > 1 else "")
            return f"{'-' if n < 0 else ''}{mant}E+{len(digits) - 1}"
        return str(n)
    d = x.denominator
    twos = (d & -d).bit_length() - 1
    rest = d >> twos
    fives = 0
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    if rest == 1:
        k = max(twos, fives)
        num = x.numerator * (10 ** k) // d          # exact: d divides 10^k
        sign = "-" if num < 0 else ""
        digits = str(abs(num)).rjust(k + 1, "0")
        whole, frac = digits[:-k], digits[-k:].rstrip("0")
        if whole == "0" and len(frac) - len(frac.lstrip("0")) >= 6:   # tiny: scientific notation, still exact
            lead = len(frac) - len(frac.lstrip("0"))
            sig = frac.lstrip("0")
            mant = sig[0] + ("." + sig[1:] if len(sig) > 1 else "")
            return f"{sign}{mant}E-{lead + 1}"
        return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"
    return f"{x.numerator}/{x.denominator}"


def dec_up(x: float, sig: int = 9) -> str:
    """A decimal >= x with ``sig`` significant digits (the smallest such, except that magnitudes
    below 1e-290 round outward to 1E-290 or 0, so that every plan number stays in range)."""
    if 0 < abs(x) < 1e-290:
        return "1E-290" if x > 0 else "0"
    return _dec_round(x, sig, up=True)


def dec_down(x: float, sig: int = 9) -> str:
    """A decimal <= x with ``sig`` significant digits (tiny magnitudes: 0 or -1E-290)."""
    if 0 < abs(x) < 1e-290:
        return "0" if x > 0 else "-1E-290"
    return _dec_round(x, sig, up=False)


def _dec_round(x: float, sig: int, up: bool) -> str:
    if not math.isfinite(x):
        raise ValueError(f"cannot write non-finite {x!r} as an exact number")
    f = Fraction(x)
    if f == 0:
        return "0"
    neg = f < 0
    a = -f if neg else f
    e = math.floor(math.log10(float(a))) if float(a) > 0 else -400
    # adjust e so that 10^e <= a < 10^(e+1) exactly
    while Fraction(10) ** e > a:
        e -= 1
    while Fraction(10) ** (e + 1) <= a:
        e += 1
    scale = Fraction(10) ** (sig - 1 - e)
    m = a * scale
    toward_inf = up != neg          # rounding magnitude up?
    mi = math.ceil(m) if toward_inf else math.floor(m)
    val = Fraction(mi) / scale
    return fmt_number(-val if neg else val)


def round_up(x: Fraction, bits: int = 64) -> Fraction:
    """A dyadic rational >= x with at most ``bits`` significant bits (x >= 0)."""
    if x <= 0:
        return Fraction(math.floor(x * 2 ** bits), 2 ** bits) if x < 0 else Fraction(0)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    shift = bits - e
    if shift >= 0:
        n = -((-x.numerator << shift) // x.denominator)
        return Fraction(n, 1 << shift)
    n = -((-x.numerator) // (x.denominator << -shift))
    return Fraction(n << -shift)


def sqrt_up(x: Fraction, bits: int = 64) -> Fraction:
    """A rational >= sqrt(x), within 2^-bits relative (x >= 0)."""
    if x < 0:
        raise ValueError("sqrt of a negative number")
    if x == 0:
        return Fraction(0)
    scale = 2 * bits + max(0, x.denominator.bit_length() - x.numerator.bit_length())
    n = x.numerator << (2 * scale)
    r = math.isqrt(n // x.denominator)
    for cand in (Fraction(r, 1 << scale), Fraction(r + 1, 1 << scale)):   # exact for perfect squares
        if cand * cand >= x:
            return cand
    return Fraction(r + 2, 1 << scale)


EXP_MAX_ARG = 65536        # exp(65536) ~ 2^94548: still a few KB as an exact integer


def exp_up(x: Fraction, bits: int = 64) -> Fraction:
    """A rational >= exp(x), for x >= 0, by a Taylor sum with a remainder bound and squaring.

    For 0 <= y <= 1/2: exp(y) <= sum_{k<=N} y^k/k! + 2 y^(N+1)/(N+1)!  (the tail is a geometric
    series with ratio <= 1/2). exp(x) = exp(x / 2^s)^(2^s); every intermediate is rounded up.
    """
    if x < 0:
        raise ValueError("exp_up is defined here for x >= 0")
    if x > EXP_MAX_ARG:
        raise InputError(f"a bound needs exp({float(x):.3g}); arguments above {EXP_MAX_ARG} are refused (the "
                         "bound would be astronomically large and its exact value would not fit in memory)")
    s = 0
    y = x
    while y > Fraction(1, 2):
        y /= 2
        s += 1
    total, term, k = Fraction(1), Fraction(1), 0
    n_terms = 24
    for k in range(1, n_terms + 1):
        term = term * y / k
        total += term
    tail = 2 * term * y / (n_terms + 1)
    r = round_up(total + tail, bits)
    for _ in range(s):
        r = round_up(r * r, bits)
    return r


BOUND_LIMIT = Fraction(10) ** 300


def fmt_bound(x: Fraction) -> str | None:
    """A bound as an exact string, or None (JSON null) above 1e300: beyond the plan number range such a
    bound is vacuous, and its exact digits may not even be printable (Python refuses integers of more
    than 4300 digits). Every obligation decides with the exact value; only the witness is null."""
    return None if x > BOUND_LIMIT else fmt_number(x)


def show_bound(x) -> str:
    """A bound in a message: 4 significant digits, or "more than 1E+300" (beyond floats and plan numbers)."""
    return "more than 1E+300" if x > BOUND_LIMIT else dec_up(float(x), 4)
