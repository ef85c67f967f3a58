"""A reported maximum's witness, re-evaluated in outward-rounded interval arithmetic (docs/design.md §2.1b).

``position_stats`` widens float64 maxima by derived rounding bounds (§2.1a), which rest on one assumption
about a library (the accuracy of the vectorized exp). Here, for one query q and key position t, alpha_t,
||V_t - o|| and kappa_t(q) are enclosed with no such assumption:

* scores: every product q_c K_sc of two float32 numbers is exact in float64 and ``math.fsum`` rounds their
  sum correctly, so the exact dot product lies within one ulp of it; tau multiplies in ``mpmath.iv``;
* exp by mpmath's directed-rounded exp (the function ``mpmath.iv.exp`` is built on), except where a score
  is more than 60 below the largest, whose exp lies in [0, 2^-86]; the normalizing sum and every alpha_s
  from those ends by ``math.fsum`` and IEEE division, each pushed one ulp outward;
* o = sum_s alpha_s V_s: per channel, the lower and upper sums of the interval products, each product
  pushed one ulp outward (IEEE multiplication is correctly rounded), summed by ``math.fsum`` and pushed one
  ulp outward again (fsum is correctly rounded);
* ||V_t - o|| and kappa_t(q) = 1/2 tau^2 ||q||^2 alpha_t |1 - 2 alpha_t| ||V_t - o|| in ``mpmath.iv``.

The exact maximum over queries at t is >= the witness's exact value, so the analysis requires the float
enclosure's upper end to be >= the witness's lower end (else the derivation is wrong and it stops), and
raises the lower end to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mpmath
import numpy as np
from mpmath.libmp import from_float, mpf_exp, round_ceiling, round_floor, to_float

#: below the largest score by more than this, an exp is enclosed by [0, 2^-86] (e^-60 < 2^-86)
_FAR = 60.0
_FAR_EXP = 2.0 ** -86


@dataclass(frozen=True)
class WitnessEnclosure:
    """Rigorous [lo, hi] of each quantity at one (query, key position); floats, rounded outward."""
    alpha: tuple
    vo: tuple
    alpha_vo: tuple
    kappa: tuple
    grad: tuple


def _down(x):
    return np.nextafter(x, -np.inf)


def _up(x):
    return np.nextafter(x, np.inf)


def _lo(x) -> float:
    return float(_down(float(x.a)))


def _hi(x) -> float:
    return float(_up(float(x.b)))


def _exp_bounds(x_lo: np.ndarray, x_hi: np.ndarray):
    """[exp(x_lo) rounded down, exp(x_hi) rounded up] per entry (mpmath's directed-rounded exp at 53 bits, the
    function ``mpmath.iv.exp`` is built on); arguments below -_FAR get [0, 2^-86]."""
    lo, hi = np.zeros_like(x_lo), np.full_like(x_hi, _FAR_EXP)
    for j in np.nonzero(x_hi >= -_FAR)[0]:
        lo[j] = to_float(mpf_exp(from_float(float(x_lo[j])), 53, round_floor), rnd=round_floor)
        hi[j] = to_float(mpf_exp(from_float(float(x_hi[j])), 53, round_ceiling), rnd=round_ceiling)
    return lo, hi


def _fsum_bounds(lo_terms, hi_terms):
    """[sum lo_terms rounded down, sum hi_terms rounded up]: math.fsum is correctly rounded, then one ulp out."""
    return float(_down(math.fsum(lo_terms))), float(_up(math.fsum(hi_terms)))


def enclose(q, keys, values, tau: float, allowed, t: int) -> WitnessEnclosure:
    """q (d,), keys/values (T, d) float32 numbers (numpy or torch), allowed (T,) bool, t an allowed position,
    tau > 0 a float."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    ok = np.asarray(allowed, dtype=bool)
    if not ok[t] or not tau > 0:
        raise ValueError(f"position {t} is not attended by the witness query, or tau = {tau} is not positive")
    idx = np.nonzero(ok)[0]
    prods = k[idx] * q[None, :]                                     # exact: float32 x float32 fits float64
    dots = np.array([math.fsum(row) for row in prods])              # correctly rounded: exact within an ulp
    s_lo, s_hi = _down(_down(dots) * tau), _up(_up(dots) * tau)
    m = float(s_lo.max())
    e_lo, e_hi = _exp_bounds(_down(s_lo - m), _up(s_hi - m))        # e^(s - m) with the same m for all
    z_lo, z_hi = _fsum_bounds(e_lo, e_hi)
    a_lo, a_hi = _down(e_lo / z_hi), _up(e_hi / z_lo)               # alpha_s, every s
    vv = v[idx]
    p1, p2 = a_lo[:, None] * vv, a_hi[:, None] * vv                 # the interval products' ends
    plo, phi = _down(np.minimum(p1, p2)), _up(np.maximum(p1, p2))
    o_lo = np.array([float(_down(math.fsum(col))) for col in plo.T])
    o_hi = np.array([float(_up(math.fsum(col))) for col in phi.T])
    vt = v[t]
    d_lo, d_hi = _down(vt - o_hi), _up(vt - o_lo)                   # V_t - o, per channel
    sq_hi = _up(np.maximum(d_lo * d_lo, d_hi * d_hi))
    sq_lo = np.where((d_lo <= 0) & (d_hi >= 0), 0.0, _down(np.minimum(d_lo * d_lo, d_hi * d_hi)))
    iv = mpmath.iv
    with mpmath.workprec(60):
        vo = iv.sqrt(iv.mpf(list(_fsum_bounds(sq_lo, sq_hi))))
        j = int(np.searchsorted(idx, t))
        a_t = iv.mpf([float(a_lo[j]), float(min(a_hi[j], 1.0))])
        qn2 = iv.mpf(list(_fsum_bounds(q * q, q * q)))
        one_m = 1 - 2 * a_t
        abs_1m = iv.mpf([0.0 if one_m.a <= 0 <= one_m.b else min(abs(one_m.a), abs(one_m.b)),
                         max(abs(one_m.a), abs(one_m.b))])
        tau_i = iv.mpf(tau)
        avo = a_t * vo
        kappa = tau_i * tau_i * qn2 * a_t * abs_1m * vo / 2
        grad = tau_i * iv.sqrt(qn2) * avo
        return WitnessEnclosure(*((max(_lo(x), 0.0), _hi(x)) for x in (a_t, vo, avo, kappa, grad)))
