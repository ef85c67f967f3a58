"""Theorem 5.7 at every position: eps >= c * kappa * D^2 * u, decided exactly.

Like a robust geometric predicate: a numpy floating-point filter evaluates both sides with every
operation rounded outward by one ulp (``np.nextafter``), which decides almost every entry; the
entries it cannot separate are decided exactly with ``fractions.Fraction``. Inputs are the exact
rationals of the plan; their float64 images are rounded outward first.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np


def up(x: Fraction) -> float:
    """The smallest float64 >= x (x finite, |x| < 2^1000)."""
    f = float(x)
    return f if Fraction(f) >= x else float(np.nextafter(f, np.inf))


def down(x: Fraction) -> float:
    f = float(x)
    return f if Fraction(f) <= x else float(np.nextafter(f, -np.inf))


def _mul_up(a, b):
    return np.nextafter(a * b, np.inf)


def _mul_down(a, b):
    return np.nextafter(a * b, -np.inf)


@dataclass
class FilterResult:
    proved: np.ndarray      # bool per entry: eps >= rhs for sure
    refuted: np.ndarray     # bool per entry: eps < rhs for sure
    exact_calls: int = 0


def decide(eps: Fraction, c: Fraction, kappa_hi: np.ndarray, d_hi: np.ndarray, u: np.ndarray,
           exact: tuple | None = None) -> FilterResult:
    """Decide eps >= c kappa D^2 u for every entry.

    kappa_hi, d_hi, u: float64 arrays that are *upper* bounds of the exact values (for a proof) —
    pass the exact values as ``exact = (kappa, d, u)`` lists of Fractions (or a callable index ->
    (kappa, d, u)) for the fallback; without them undecided entries stay undecided.
    The filter never errs: rhs_hi >= c kappa D^2 u >= rhs_lo for the exact values because every
    product is rounded outward and the float inputs are rounded up (for rhs_hi) / the exact
    fallback is used when rhs_lo could be below.
    """
    c_hi, c_lo = up(c), down(c)
    e_lo, e_hi = down(eps), up(eps)
    rhs_hi = _mul_up(_mul_up(_mul_up(_mul_up(np.full_like(kappa_hi, c_hi), kappa_hi), d_hi), d_hi), u)
    proved = e_lo >= rhs_hi
    refuted = np.zeros_like(proved)
    undecided = np.flatnonzero(~proved)
    calls = 0
    if exact is not None and undecided.size:
        get = exact if callable(exact) else (lambda i: (exact[0][i], exact[1][i], exact[2][i]))
        for i in undecided:
            k, d, uu = get(int(i))
            calls += 1
            if eps >= c * k * d * d * uu:
                proved[i] = True
            else:
                refuted[i] = True
    return FilterResult(proved, refuted, calls)
