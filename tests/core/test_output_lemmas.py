"""The output claims of docs/design.md §2.6 (hnfverify/core/bound.py: logit_osc_bound, kl_bound, greedy_kept)
against exact-rational instances: logits z and changes dz as Fractions, KL(p || p~) and KL(p~ || p) from their
definitions in mpmath (50 significant digits beyond those lost to cancellation), argmaxes and oscillations
exact. Edge shapes: n = 1, one dominant logit, all-equal logits, osc = 0, tiny (1e-30) and huge (200)
oscillations, two-point distributions where osc^2/8 is nearly attained. Mutants (/9 for /8, >= for >, the
gain without its factor 2) are shown to fail. Torch-free (the trusted core's exact rationals)."""

import math
from fractions import Fraction as F

import mpmath
import pytest
from hypothesis import find, given, settings, strategies as st

from hnfverify.core.bound import UNBOUNDED, greedy_kept, kl_bound, logit_osc_bound
from hnfverify.core.numbers import round_up, sqrt_up

DIGITS = 50
REL = mpmath.mpf(10) ** -40          # comparisons hold up to 1e-40 relative to the bound
TINY = F(1, 10 ** 30)
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)


def _mp(x):
    x = F(x)
    return mpmath.mpf(x.numerator) / x.denominator


def _osc(xs):
    return max(xs) - min(xs)


def _digits(o, z, dz):
    """Working precision: DIGITS + the digits the definition loses to cancellation (2 log10(1/osc) for
    osc < 1, since KL ~ osc^2 is a sum of terms ~ osc) + the magnitude of the logits."""
    lost = math.ceil(-math.log10(float(o))) if 0 < o < 1 else 0
    mag = max(abs(v) for v in list(z) + list(dz))
    return DIGITS + 2 * lost + math.ceil(math.log10(2 + float(mag))) + 5


def _log_softmax(xs):
    top = max(xs)
    lse = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in xs))
    return [v - lse for v in xs]


def kl_both(z, dz):
    """(KL(p || p~), KL(p~ || p), absolute noise floor), p = softmax(z), p~ = softmax(z + dz), from the
    definitions sum p log(p/p~) and sum p~ log(p~/p); z + dz is formed exactly before rounding."""
    o = _osc(dz)
    dps = _digits(o, z, dz)
    with mpmath.workdps(dps):
        lp = _log_softmax([_mp(v) for v in z])
        lq = _log_softmax([_mp(a + b) for a, b in zip(z, dz)])
        fwd = mpmath.fsum(mpmath.exp(a) * (a - b) for a, b in zip(lp, lq))
        rev = mpmath.fsum(mpmath.exp(b) * (b - a) for a, b in zip(lp, lq))
        scale = 2 + float(max(abs(v) for v in list(z) + list(dz)))
        noise = mpmath.mpf(10) ** -(dps - 5) * scale
        return +fwd, +rev, noise, dps


def _leq(x, bound, noise):
    return x <= bound * (1 + REL) + noise


# ---------------------------------------------------------------------------------------------- strategies
def _frac(scale):
    return st.integers(-10 ** 6, 10 ** 6).map(lambda k: F(k, 10 ** 6) * scale)


@st.composite
def logits(draw, n=None):
    n = n or draw(st.sampled_from([1, 2, 2, 3, 3, 5, 8, 50]))
    scale = draw(st.sampled_from([F(1), F(10), F(1, 100)]))
    z = [draw(_frac(scale)) for _ in range(n)]
    shape = draw(st.sampled_from(["random", "dominant", "equal"]))
    if shape == "dominant":
        z[draw(st.integers(0, n - 1))] = F(draw(st.sampled_from([20, 50, 1000])))
    elif shape == "equal":
        z = [z[0]] * n
    return z


@st.composite
def changes(draw, n):
    scale = draw(st.sampled_from([F(0), TINY, F(1, 10 ** 6), F(1, 100), F(1, 2), F(1), F(3), F(10), F(200)]))
    shape = draw(st.sampled_from(["random", "spike", "twolevel", "pm", "constant"]))
    if shape == "random":
        return [draw(_frac(scale)) for _ in range(n)]
    if shape == "spike":
        dz = [F(0)] * n
        dz[draw(st.integers(0, n - 1))] = scale * draw(st.sampled_from([1, -1]))
        return dz
    if shape == "twolevel":
        return [scale if draw(st.booleans()) else F(0) for _ in range(n)]
    if shape == "pm":
        return [scale / 2 * draw(st.sampled_from([1, -1])) for _ in range(n)]
    c = draw(_frac(F(7)))
    return [c] * n                                                  # osc = 0, a pure shift


@st.composite
def instances(draw):
    if draw(st.integers(0, 4)) == 0:                                # two-point, p = softmax(0, g): nearly tight for g = 0
        g = draw(st.sampled_from([F(0), F(0), F(1, 10 ** 6), F(1, 10)])) * draw(st.integers(-1000, 1000))
        a = draw(st.sampled_from([TINY, F(1, 10 ** 6), F(1, 10), F(1), F(3), F(200)])) * F(draw(st.integers(1, 1000)), 1000)
        dz = [F(0), a] if draw(st.booleans()) else [-a / 2, a / 2]
        return [F(0), g], dz
    z = draw(logits())
    return z, draw(changes(len(z)))


# ---------------------------------------------------------------------------------------------- KL (Hoeffding)
@SETTINGS
@given(instances())
def test_kl_both_directions_at_most_osc_squared_over_8_and_kl_bound(inst):
    z, dz = inst
    o = _osc(dz)
    kb = kl_bound(o)
    assert kb >= o * o / 8                                          # exact: round_up only rounds up
    assert kb <= o * o / 8 * (1 + F(1, 2 ** 62))                    # and only by one unit in 64 bits
    fwd, rev, noise, dps = kl_both(z, dz)
    with mpmath.workdps(dps):
        exact_b = _mp(o) ** 2 / 8
        for kl in (fwd, rev):
            assert kl >= -noise
            assert _leq(kl, exact_b, noise), (z[:3], dz[:3], kl, exact_b)
            assert _leq(kl, _mp(kb), noise), (z[:3], dz[:3], kl, kb)


@SETTINGS
@given(instances(), st.integers(0, 3))
def test_kl_bound_of_any_z_above_osc(inst, k):
    """Z >= osc(dz) (as logit_osc_bound returns it): kl_bound(Z) still bounds both KLs."""
    z, dz = inst
    o = _osc(dz)
    Z = round_up(o * (1 + F(k, 7)) + F(k, 10 ** 40))
    fwd, rev, noise, dps = kl_both(z, dz)
    with mpmath.workdps(dps):
        assert _leq(max(fwd, rev), _mp(kl_bound(Z)), noise)


def _kl9(z):
    return UNBOUNDED if z == UNBOUNDED else round_up(z * z / 9)


@pytest.mark.parametrize("dz", [[F(0), F(1, 10)], [F(-1, 20), F(1, 20)], [F(0), TINY], [F(0), F(1, 2)]])
def test_mutant_kl_over_9_is_violated_in_both_directions(dz):
    z = [F(0), F(0)]                                                # p = (1/2, 1/2): KL ~ osc^2/8 for small osc
    fwd, rev, noise, dps = kl_both(z, dz)
    with mpmath.workdps(dps):
        assert fwd > _mp(_kl9(_osc(dz))) and rev > _mp(_kl9(_osc(dz)))
        assert _leq(fwd, _mp(kl_bound(_osc(dz))), noise) and _leq(rev, _mp(kl_bound(_osc(dz))), noise)


def test_mutant_kl_over_9_is_violated_on_a_generated_instance():
    """The generated stream itself (not only the constructed cases above) refutes the /9 mutant."""
    def violates(inst):
        z, dz = inst
        fwd, rev, _, dps = kl_both(z, dz)
        with mpmath.workdps(dps):
            return max(fwd, rev) > _mp(_kl9(_osc(dz)))
    z, dz = find(instances(), violates, settings=settings(max_examples=200, derandomize=True, database=None))
    assert _osc(dz) > 0


def test_kl_zero_for_a_shift_and_for_one_token():
    for z, dz in (([F(1), F(-2), F(3)], [F(5, 7)] * 3), ([F(4)], [F(200)])):
        fwd, rev, noise, _ = kl_both(z, dz)
        assert kl_bound(_osc(dz)) == 0
        assert abs(fwd) <= noise and abs(rev) <= noise


# ---------------------------------------------------------------------------------------------- greedy
def _argmax(xs):
    top = max(xs)
    idx = [i for i, x in enumerate(xs) if x == top]
    return idx[0] if len(idx) == 1 else None


def _margin(xs, j):
    rest = [x for k, x in enumerate(xs) if k != j]
    return xs[j] - max(rest) if rest else F(10) ** 9              # one token: nothing to lose against


@st.composite
def greedy_cases(draw):
    zt = draw(logits(n=draw(st.sampled_from([2, 2, 3, 5, 8, 50]))))
    if draw(st.booleans()):                                         # a near tie at the top
        a, b = draw(st.permutations(range(len(zt))))[:2]
        zt[a] = max(zt) + F(1, 10 ** 6)
        zt[b] = zt[a] - F(1, 10 ** draw(st.integers(6, 30)))
    j = _argmax(zt)
    if j is None:
        zt[0] = max(zt) + 1
        j = 0
    return zt, j


@SETTINGS
@given(greedy_cases(), st.integers(0, 1000), st.data())
def test_greedy_kept_when_margin_exceeds_osc(case, u, data):
    """dz with osc(dz) = (u/1000) margin: for u < 1000 greedy_kept must say True and the argmax must agree;
    u = 1000 plants the tie (margin == osc, dz = +osc/2 on the top token, -osc/2 on the runner-up)."""
    zt, j = case
    n = len(zt)
    m = _margin(zt, j)
    o = m * F(u, 1000)
    dz = [o / 2 * F(data.draw(st.integers(-1000, 1000)), 1000) for _ in range(n)]
    if u == 1000:
        a, b = j, max((k for k in range(n) if k != j), key=lambda k: zt[k])
    else:
        a, b = data.draw(st.permutations(range(n)))[:2]
    dz[a], dz[b] = o / 2, -o / 2                                     # osc(dz) = o exactly, signs adversarial or not
    assert _osc(dz) == o
    z = [x - d for x, d in zip(zt, dz)]                              # z~ = z + dz
    if u == 1000:
        assert _argmax(z) is None and not greedy_kept(m, o)          # a tie: strictness matters
        return
    Z = logit_osc_bound(o, F(1))                                     # Z = round_up(o) >= osc(dz)
    assert Z >= o
    assert greedy_kept(m, o) and greedy_kept(m, Z) == (m > Z)
    assert _argmax(z) == j
    assert _margin(z, j) >= m - o                                   # the quantitative form
    # symmetric: from the other run's margin
    mz = _margin(z, j)
    if greedy_kept(mz, o):
        assert _argmax(zt) == j


@SETTINGS
@given(greedy_cases(), st.data())
def test_greedy_kept_implies_same_argmax_for_arbitrary_changes(case, data):
    zt, j = case
    n = len(zt)
    scale = data.draw(st.sampled_from([TINY, F(1, 10 ** 6), F(1, 100), F(1), F(10), F(200)]))
    dz = [data.draw(_frac(scale)) for _ in range(n)]
    Z = _osc(dz) + data.draw(st.sampled_from([F(0), F(0), TINY, F(1, 100)]))
    m = _margin(zt, j)
    z = [x - d for x, d in zip(zt, dz)]
    assert greedy_kept(m, Z) == (m > Z)
    if greedy_kept(m, Z):
        assert _argmax(z) == j, (zt[:4], dz[:4], m, Z)


def test_greedy_strictness_matters_a_tie_at_margin_equal_osc():
    zt, dz = [F(1), F(0), F(-5)], [F(1, 2), F(-1, 2), F(0)]          # margin 1 = osc(dz)
    z = [x - d for x, d in zip(zt, dz)]
    assert _margin(zt, 0) == _osc(dz) == 1
    assert _argmax(z) is None                                        # z = (1/2, 1/2, -5): a tie
    assert not greedy_kept(F(1), F(1))                               # the code refuses
    assert (lambda m, zz: zz != UNBOUNDED and m >= zz)(F(1), F(1))  # the non-strict mutant would accept


def test_unbounded_propagates():
    assert logit_osc_bound(UNBOUNDED, F(3)) == UNBOUNDED
    assert kl_bound(UNBOUNDED) == UNBOUNDED
    assert kl_bound(logit_osc_bound(UNBOUNDED, F(1, 10 ** 9))) == UNBOUNDED
    assert not greedy_kept(F(10) ** 300, UNBOUNDED)


# ---------------------------------------------------------------------------------------------- logit oscillation
@SETTINGS
@given(st.fractions(min_value=0, max_value=10 ** 6, max_denominator=10 ** 12),
       st.fractions(min_value=0, max_value=10 ** 4, max_denominator=10 ** 12),
       st.sampled_from([F(1), TINY, F(10) ** 30]))
def test_logit_osc_bound_rounds_up_exactly(phi, gain, s):
    phi = phi * s
    Z = logit_osc_bound(phi, gain)
    assert isinstance(Z, F)
    assert Z >= gain * phi
    assert Z <= gain * phi * (1 + F(1, 2 ** 62))


def _norm_up(v):
    return sqrt_up(sum((x * x for x in v), F(0)))


@st.composite
def heads(draw):
    n = draw(st.sampled_from([1, 2, 3, 8]))
    d = draw(st.sampled_from([1, 2, 4]))
    W = [[draw(_frac(F(1))) for _ in range(d)] for _ in range(n)]
    if n >= 2 and draw(st.booleans()):                              # the extremal rows: w_2 = -w_1, dH || w_1
        W[1] = [-x for x in W[0]]
        H = [x * draw(_frac(F(1, 10 ** draw(st.sampled_from([0, 6, 20]))))) for x in W[0]]
    else:
        H = [draw(_frac(draw(st.sampled_from([F(1), F(1, 10 ** 6), TINY])))) for _ in range(d)]
    z = draw(logits(n=n))
    return W, H, z


@SETTINGS
@given(heads())
def test_end_to_end_lm_head_change(head):
    """dz = W dH exactly; Gamma = 2 max ||w_i|| and Phi = ||dH|| rounded up: osc(dz) <= Z = logit_osc_bound,
    both KLs <= kl_bound(Z), and greedy_kept(margin, Z) keeps the argmax."""
    W, H, z = head
    dz = [sum((a * b for a, b in zip(w, H)), F(0)) for w in W]
    gain = 2 * max(_norm_up(w) for w in W)
    phi = _norm_up(H)
    Z = logit_osc_bound(phi, gain)
    assert _osc(dz) <= Z
    fwd, rev, noise, dps = kl_both(z, dz)
    with mpmath.workdps(dps):
        assert _leq(max(fwd, rev), _mp(kl_bound(Z)), noise)
    zt = [a + b for a, b in zip(z, dz)]
    j = _argmax(zt)
    if j is not None and len(z) > 1 and greedy_kept(_margin(zt, j), Z):
        assert _argmax(z) == j


def test_mutant_gain_without_factor_two_is_violated():
    W = [[F(3), F(4)], [F(-3), F(-4)]]                                # w_2 = -w_1, ||w|| = 5
    H = [F(3, 50), F(4, 50)]                                          # dH = w_1 / 50, ||dH|| = 1/10
    dz = [sum(a * b for a, b in zip(w, H)) for w in W]               # (1/2, -1/2): osc = 1 = 2 ||w|| ||dH||
    assert _osc(dz) == 1
    assert logit_osc_bound(F(1, 10), F(10)) >= 1
    assert logit_osc_bound(F(1, 10), F(5)) < _osc(dz)               # Gamma = max ||w|| (no factor 2) fails
