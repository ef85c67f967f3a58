"""The plan-time bound E_h (docs/design.md §2.4) against real attention errors: for random small instances
whose inputs satisfy the bound's assumptions exactly (the query's own masses, spreads and error norms),
E_h >= ||o~ - o|| computed at 60 digits. Edge cases: r -> 0, huge r, one dominant position, all-equal
scores, one position. Torch-free (the trusted core's exact rationals)."""

from fractions import Fraction as F

import mpmath
from hypothesis import given, settings, strategies as st

from hnfverify.core.bound import head_error, tanh_half_up

mpmath.mp.dps = 60
SEGS = ("sink", "recent", "rest")


def _attn(tau, q, keys, values):
    s = [tau * mpmath.fsum(a * b for a, b in zip(q, k)) for k in keys]
    mx = max(s)
    e = [mpmath.exp(x - mx) for x in s]
    z = mpmath.fsum(e)
    alpha = [x / z for x in e]
    o = [mpmath.fsum(a * v[i] for a, v in zip(alpha, values)) for i in range(len(values[0]))]
    return alpha, o


def _norm(x):
    return mpmath.sqrt(mpmath.fsum(c * c for c in x))


def _unit(rng_vals):
    n = _norm(rng_vals)
    return [c / n for c in rng_vals] if n > 0 else [mpmath.mpf(1)] + [mpmath.mpf(0)] * (len(rng_vals) - 1)


coord = st.floats(min_value=-3, max_value=3, allow_nan=False)


@st.composite
def instances(draw):
    d = draw(st.integers(1, 4))
    n = draw(st.integers(1, 7))
    seg_of = [SEGS[min(2, draw(st.integers(0, 2)))] for _ in range(n)]
    kind = draw(st.sampled_from(["random", "dominant", "equal"]))
    keys = [[mpmath.mpf(draw(coord)) for _ in range(d)] for _ in range(n)]
    if kind == "equal":
        keys = [list(keys[0]) for _ in range(n)]
    values = [[mpmath.mpf(draw(coord)) for _ in range(d)] for _ in range(n)]
    q = [mpmath.mpf(draw(coord)) for _ in range(d)]
    if kind == "dominant":
        keys[0] = [c * 20 for c in q]
    scale_k = draw(st.sampled_from([0.0, 1e-9, 1e-3, 0.1, 1.0, 30.0]))
    scale_v = draw(st.sampled_from([0.0, 1e-6, 0.1, 1.0]))
    dkn = {s: F(draw(st.floats(0, 1))) * F(scale_k) for s in SEGS}
    dvn = {s: F(draw(st.floats(0, 1))) * F(scale_v) for s in SEGS}
    dirs_k = [_unit([mpmath.mpf(draw(coord)) for _ in range(d)]) for _ in range(n)]
    dirs_v = [_unit([mpmath.mpf(draw(coord)) for _ in range(d)]) for _ in range(n)]
    frac = [draw(st.floats(0, 1)) for _ in range(2 * n)]
    keys_q = [[k + mpmath.mpf(frac[t]) * mpmath.mpf(dkn[seg_of[t]].numerator) / dkn[seg_of[t]].denominator * u
               for k, u in zip(keys[t], dirs_k[t])] for t in range(n)]
    values_q = [[v + mpmath.mpf(frac[n + t]) * mpmath.mpf(dvn[seg_of[t]].numerator) / dvn[seg_of[t]].denominator * u
                 for v, u in zip(values[t], dirs_v[t])] for t in range(n)]
    tau = F(draw(st.sampled_from([1, 1, 2])), 4)
    return d, n, seg_of, q, keys, values, keys_q, values_q, dkn, dvn, tau


def _up(x) -> F:
    """A rational at or above the mpf x (60 digits: a relative step of 1e-50 covers the rounding)."""
    return F(mpmath.nstr(x * (1 + mpmath.mpf(10) ** -50) + mpmath.mpf(10) ** -50, 55))


@settings(max_examples=300, deadline=None)
@given(instances())
def test_plan_time_bound_holds_for_the_query_whose_inputs_it_is_given(inst):
    d, n, seg_of, q, keys, values, keys_q, values_q, dkn, dvn, tau = inst
    alpha, o = _attn(tau, q, keys, values)
    _, o_q = _attn(tau, q, keys_q, values_q)
    err = _norm([a - b for a, b in zip(o_q, o)])
    present = [s for s in SEGS if s in seg_of]
    mass = {s: _up(mpmath.fsum(alpha[t] for t in range(n) if seg_of[t] == s)) for s in present}
    avo = {s: _up(mpmath.fsum(alpha[t] * _norm([a - b for a, b in zip(values[t], o)])
                              for t in range(n) if seg_of[t] == s)) for s in present}
    spread = {s: _up(max(_norm([a - b for a, b in zip(values[t], o)]) for t in range(n) if seg_of[t] == s))
              for s in present}
    e = head_error(tau, _up(_norm(q)), {s: dkn[s] for s in present}, {s: dvn[s] for s in present}, mass, avo, spread)
    assert mpmath.mpf(e.numerator) / e.denominator >= err * (1 - mpmath.mpf(10) ** -40), (float(e), float(err))


def test_bound_is_finite_for_huge_key_errors_and_zero_for_exact_storage():
    segs = {"sink": F(1), "rest": F(1)}
    huge = head_error(F(1, 8), F(10 ** 6), {"sink": F(10 ** 6), "rest": F(10 ** 9)}, {"sink": F(0), "rest": F(1)},
                      segs, segs, {"sink": F(3), "rest": F(5)})
    assert huge == 11                                     # max dV + 2 max ||V - o|| (tanh = 1): finite
    zero = head_error(F(1, 8), F(100), {"sink": F(0), "rest": F(0)}, {"sink": F(0), "rest": F(0)},
                      segs, segs, {"sink": F(3), "rest": F(5)})
    assert zero == 0


@given(st.fractions(min_value=0, max_value=200))
def test_tanh_half_is_an_upper_bound(x):
    assert mpmath.mpf(tanh_half_up(x).numerator) / tanh_half_up(x).denominator >= \
        mpmath.tanh(mpmath.mpf(x.numerator) / x.denominator / 2)
