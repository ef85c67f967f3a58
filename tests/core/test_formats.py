from fractions import Fraction as F

import pytest
from hypothesis import given, strategies as st

from hnfverify.errors import InputError
from hnfverify.core.formats import SegmentStats, by_name, format_table
from hnfverify.core.numbers import dec_down, dec_up, exp_up, fmt_number, parse_number, sqrt_up


def test_table_bits_and_unit_roundoffs():
    t = format_table(64, 32)
    expect = {"fp32": (32, F(1, 2**24)), "fp16": (16, F(1, 2**11)), "bf16": (16, F(1, 2**8)),
              "fp8_e4m3_t64": (F(33, 4), F(1, 16)), "fp8_e5m2_t64": (F(33, 4), F(1, 8)),
              "int8_t64": (F(17, 2), F(1, 510)), "int4_t64": (F(9, 2), F(1, 30)), "int2_t64": (F(5, 2), F(1, 6)),
              "int3_t64": (F(7, 2), F(1, 14)), "int3_c32": (4, F(1, 14)),
              "int8_c32": (9, F(1, 510)), "int4_c32": (5, F(1, 30)), "int2_c32": (3, F(1, 6))}
    expect.update({f"int{b}_c{g}": (b + F(32, g), F(1, 2 * (2**b - 1))) for b in (8, 4, 3, 2) for g in (16, 8)})
    reach = {4: F(23, 32), 3: F(9, 16), 2: F(1, 2)}          # the levels' largest distance to a point of [0, 2^b - 1]
    expect.update({f"lm{b}_{t}": (b + F(32, g), reach[b] / (2**b - 1)) for b in (4, 3, 2)
                   for t, g in (("t64", 64), ("c32", 32), ("c16", 16), ("c8", 8))})
    # the rotated per-token formats: the inner format's bits and u (docs/design.md §2.3c)
    expect.update({f"{k}{b}_t64_h": expect[f"{k}{b}_t64"] for k in ("int", "lm") for b in (4, 3, 2)})
    assert set(t) == set(expect)
    for name, (bits, u) in expect.items():
        assert t[name].bits_per_element == bits and t[name].u == u
        assert by_name(name) == t[name]
    with pytest.raises(InputError, match="unknown format"):
        by_name("int5_t64")
    with pytest.raises(InputError, match="unknown format"):
        by_name("lm8_t64")


def test_segment_bits_count_the_fp32_residual_of_channel_groups():
    f = by_name("int4_c32")
    assert f.segment_bits(64, 1) == 64 * 5
    assert f.segment_bits(70, 1) == 64 * 5 + 6 * 32
    assert by_name("int4_t64").segment_bits(70, 64) == F(9, 2) * 70 * 64


def test_error_models_are_the_proved_lemmas_per_element():
    """d = 1: the l2 bound must be exactly the per-element lemma of proofs/format_error_models.py."""
    s = SegmentStats(1, F(3), F(3), F(5))
    for b in (2, 3, 4, 8):
        u = F(1, 2 * (2**b - 1))
        lemma = u * (1 + F(1, 2**9)) * 3 + (u * F(1, 2**9) + F(1, 2**20)) * 5 + F(1, 2**23)
        assert by_name(f"int{b}_t1").l2_error(s) == lemma
    for b, w in ((4, F(23, 32)), (3, F(9, 16)), (2, F(1, 2))):
        u = w / (2**b - 1)
        lemma = u * (1 + F(1, 2**9)) * 3 + (u * F(1, 2**9) + F(1, 2**20)) * 5 + F(1, 2**23)
        assert by_name(f"lm{b}_t1").l2_error(s) == lemma
    for name, u, sub, mx in (("fp8_e4m3_t1", F(1, 16), F(2) ** -10, 448), ("fp8_e5m2_t1", F(1, 8), F(2) ** -17, 57344)):
        scale = max(F(5) * (1 + F(1, 2**9)) / mx, F(1, 2**14))
        assert by_name(name).l2_error(s) == (u + F(1, 2**21)) * 5 + sub * (1 + F(1, 2**21)) * scale


@given(st.fractions(min_value=0, max_value=10**6, max_denominator=10**9))
def test_sqrt_and_exp_upper_bounds_are_tight(x):
    import mpmath

    mpmath.mp.dps = 60
    r = sqrt_up(x)
    rm = mpmath.mpf(r.numerator) / r.denominator
    assert r * r >= x and rm - mpmath.sqrt(mpmath.mpf(x.numerator) / x.denominator) < mpmath.mpf(2) ** -50 * (1 + rm)
    if x <= 60:
        e = exp_up(x)
        true = mpmath.exp(mpmath.mpf(x.numerator) / x.denominator)
        assert mpmath.mpf(e.numerator) / e.denominator >= true
        assert mpmath.mpf(e.numerator) / e.denominator <= true * (1 + mpmath.mpf(2) ** -50)


@given(st.floats(min_value=-1e299, max_value=1e299, allow_nan=False))
def test_outward_decimal_rounding_and_canonical_numbers(x):
    assert parse_number(dec_down(x)) <= F(x) <= parse_number(dec_up(x))
    for s in (dec_up(x), dec_down(x)):
        assert parse_number(fmt_number(parse_number(s))) == parse_number(s)


def test_channel_groups_a_plan_may_use_divide_the_analysis_group():
    from hnfverify.core.formats import channel_groups_of

    assert channel_groups_of(128) == [128, 64, 32, 16, 8]
    assert channel_groups_of(32) == [32, 16, 8]
    assert channel_groups_of(12) == [12]                 # no multiple of 8 divides it: the group itself
    assert channel_groups_of(48) == [48, 24, 16, 8]
    assert "int3_c64" in format_table(64, 128) and "int3_c64" not in format_table(64, 32)
    assert "int3_t60" not in format_table(60, 32)       # 60 3-bit codes do not fill whole bytes
