"""Exact numbers: reading, writing, and upward rounding (docs/design.md §2.1)."""

import math
import re
from fractions import Fraction as F

from .base import Reject


# ---------------------------------------------------------------- exact numbers
NUM = r"-?(0|[1-9][0-9]*)((\.[0-9]+)?([eE][-+]?[0-9]+)?|/[1-9][0-9]*)"


def num(s, where="value"):
    """A plan number (the one grammar, |exponent| <= 400, magnitude 0 or in [1e-300, 1e300])."""
    if not isinstance(s, str) or len(s) > 2000 or not re.fullmatch(NUM, s):
        raise Reject(f"{where}: {str(s)[:40]!r} is not a decimal or p/q number string")
    m = re.search(r"[eE]([-+]?[0-9]+)\Z", s)
    if m and abs(int(m.group(1))) > 400:
        raise Reject(f"{where}: exponent out of range: {s[:40]!r}")
    x = F(s)
    if x != 0 and not F(1, 10 ** 300) <= abs(x) <= F(10) ** 300:
        raise Reject(f"{where}: {s[:40]!r} is out of range (|x| in [1e-300, 1e300] or 0)")
    return x


def fmt(x):
    """Canonical number text: integers plainly (>= 6 trailing zeros: d.ddE+n), finite decimals as
    decimals (>= 6 leading zeros after the point: d.ddE-n), anything else p/q."""
    x = F(x)
    n, d = x.numerator, x.denominator
    sign = "-" if n < 0 else ""

    def sci(sig, exp):
        return f"{sign}{sig[0]}{'.' + sig[1:] if len(sig) > 1 else ''}E{exp}"

    if d == 1:
        digits = str(abs(n))
        if len(digits) - len(digits.rstrip("0")) >= 6:
            return sci(digits.rstrip("0"), f"+{len(digits) - 1}")
        return str(n)
    twos = (d & -d).bit_length() - 1
    rest, fives = d >> twos, 0
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{n}/{d}"
    k = max(twos, fives)
    digits = str(abs(n) * 10 ** k // d).rjust(k + 1, "0")
    whole, frac = digits[:-k], digits[-k:].rstrip("0")
    lead = len(frac) - len(frac.lstrip("0"))
    if whole == "0" and lead >= 6:
        return sci(frac.lstrip("0"), f"-{lead + 1}")
    return f"{sign}{whole}.{frac}"


def bound(x):
    """A bound's text; null above 1e300 (beyond the plan number range a bound is vacuous, and its
    digits may be too many to print)."""
    return None if x > F(10) ** 300 else fmt(x)


def show(x):
    return "more than 1E+300" if x > F(10) ** 300 else f"{float(x):.9g}"


def round_up(x, bits=64):
    """A dyadic rational >= x with at most 64 significant bits."""
    if x == 0:
        return F(0)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    sh = bits - e
    if sh >= 0:
        return F(-((-x.numerator << sh) // x.denominator), 1 << sh)
    return F(-((-x.numerator) // (x.denominator << -sh)) << -sh)


def sqrt_up(x, bits=64):
    if x == 0:
        return F(0)
    sc = 2 * bits + max(0, x.denominator.bit_length() - x.numerator.bit_length())
    r = math.isqrt((x.numerator << (2 * sc)) // x.denominator)
    for c in (F(r, 1 << sc), F(r + 1, 1 << sc)):
        if c * c >= x:
            return c
    return F(r + 2, 1 << sc)


def exp_up(x, bits=64):
    if x > 65536:
        raise Reject("a bound needs exp of more than 65536 (`check` refuses such a plan)")
    s, y = 0, x
    while y > F(1, 2):
        y, s = y / 2, s + 1
    total, term = F(1), F(1)
    for k in range(1, 25):
        term = term * y / k
        total += term
    r = round_up(total + 2 * term * y / 25, bits)
    for _ in range(s):
        r = round_up(r * r, bits)
    return r
