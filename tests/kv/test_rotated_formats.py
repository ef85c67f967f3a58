"""The Hadamard-rotated per-token formats (docs/design.md §2.3c): the round trip stays within the proved model,
the rotation preserves scores to float rounding, the cache's read paths give the recorded values bit for bit,
and the real bytes are the accounting's."""

import math
from fractions import Fraction as F

import pytest
import torch
from hypothesis import given, strategies as st

from hnfverify.core.formats import SegmentStats, by_name, format_table
from hnfverify.core.formats.rotated import rotation_constants
from hnfverify.errors import InputError
from hnfverify.kv.quant import dequantize, dequantize_into, quantize, quantize_values
from hnfverify.kv.rotation import hadamard64, rotate

ROTATED = ["int4_t{d}_h", "int3_t{d}_h", "int2_t{d}_h", "lm4_t{d}_h", "lm3_t{d}_h", "lm2_t{d}_h"]


def _vectors(kind, d, value, seed, n=24):
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        x = torch.randn(1, 2, n, d, generator=gen) * value
    elif kind == "outliers":                    # a few huge channels among small ones: what rotation is for
        x = torch.randn(1, 2, n, d, generator=gen) * 0.1
        x[..., torch.randint(0, d, (2,), generator=gen)] = value
    elif kind == "constant":
        x = torch.full((1, 2, n, d), value)
    elif kind == "zeros":
        x = torch.zeros(1, 2, n, d)
    else:                                       # tiny: subnormal after the rotation's scale
        x = torch.randn(1, 2, n, d, generator=gen) * 1e-39
    return x.to(torch.float32)


def _stats(x, measured=True):
    """The tensor's own ranges as upper bounds (the analyzer's method for the rotated ones)."""
    d = x.shape[-1]
    xd = x.double()
    d_tok = float(((xd.amax(-1) - xd.amin(-1)) * math.sqrt(d)).max()) * (1 + 1e-12)
    amax = float(xd.abs().max())
    if not measured:
        return SegmentStats(d, F(d_tok), F(d_tok), F(amax))
    y = xd @ hadamard64(d)
    w = xd.norm(dim=-1, keepdim=True) * ((d + 2) * 2.0 ** -52)
    lo, hi = y - w, y + w
    a_h = float(torch.maximum(lo.abs(), hi.abs()).max())
    d_h = float(((hi.amax(-1) - lo.amin(-1)) * math.sqrt(d)).max()) * (1 + 1e-12)
    return SegmentStats(d, F(d_tok), F(d_tok), F(amax), F(d_h), F(a_h))


def _l2_errors(y, x):
    """||y_t - x_t||_2 per vector, exactly (float32 values as rationals), as floats rounded up."""
    out = []
    for a, b in zip(y.reshape(-1, y.shape[-1]).tolist(), x.reshape(-1, x.shape[-1]).tolist()):
        s = sum((F(p) - F(q)) ** 2 for p, q in zip(a, b))
        out.append(math.sqrt(s) * (1 + 1e-15))
    return out


@given(name=st.sampled_from(ROTATED), d=st.sampled_from([16, 64, 128]),
       kind=st.sampled_from(["gaussian", "outliers", "constant", "zeros", "tiny"]),
       value=st.sampled_from([1e-3, 1.0, 37.5, 3000.0, -20000.0]), measured=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_rotated_round_trip_within_the_proved_model(name, d, kind, value, measured, seed):
    fmt = by_name(name.format(d=d))
    x = _vectors(kind, d, value, seed)
    s = _stats(x, measured)
    if not fmt.representable(s):
        return
    y = dequantize(quantize(x, fmt))
    assert y.shape == x.shape and y.dtype == torch.float32
    bound = float(fmt.l2_error(s))
    assert max(_l2_errors(y, x)) <= bound


def test_rotation_makes_the_outlier_bound_smaller_and_the_error_too():
    """Two outlier channels among Gaussian ones: the per-token grid of x spans them, the rotated grid spreads them;
    the proved bound and the real error both drop (what the format is for). (On outliers among near-zero channels
    the rotated vector takes three values, which the grid misses: rotation loses there; the bound still holds.)"""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 64, 64, generator=gen)
    x[..., [5, 40]] = 40.0
    s = _stats(x)
    plain, rot = by_name("int3_t64"), by_name("int3_t64_h")
    assert rot.l2_error(s) < 0.6 * plain.l2_error(s)
    e_plain = (dequantize(quantize(x, plain)) - x).norm(dim=-1).mean()
    e_rot = (dequantize(quantize(x, rot)) - x).norm(dim=-1).mean()
    assert e_rot < 0.8 * e_plain, (float(e_rot), float(e_plain))


@given(d=st.sampled_from([4, 16, 32, 64, 128]), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 100.0]))
def test_rotation_preserves_scores_to_float_rounding(d, seed, scale):
    """R is orthogonal up to rounding: (R q).(R k) = q.k and R(R(k)) = k within the lemma's rho."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(8, d, generator=gen) * scale for _ in range(2))
    rho, tau = (float(v) for v in rotation_constants(d))
    qn, kn = q.double().norm(dim=-1), k.double().norm(dim=-1)
    exact = (q.double() * k.double()).sum(-1)
    rotated = (rotate(q).double() * rotate(k).double()).sum(-1)
    slack = 1e-12 * qn * kn                     # the float64 dot products' own rounding
    assert torch.all((rotated - exact).abs() <= (2 * rho + rho * rho) * qn * kn + 3 * tau * (qn + kn) + slack)
    back = rotate(rotate(k)).double()
    assert torch.all((back - k.double()).norm(dim=-1) <= (2 * rho + rho * rho) * kn + 3 * tau)
    assert torch.allclose(rotate(k).double(), k.double() @ hadamard64(d), rtol=0, atol=1e-5 * scale)
    for dd in (1, 2, d):                        # in place, and into a strided view, the same bits
        x = torch.randn(2, 5, dd, generator=gen)
        want = rotate(x)
        big = torch.zeros(2, 9, dd)
        rotate(x, out=big[:, 2:7])
        assert torch.equal(big[:, 2:7], want)
        rotate(x, out=x)
        assert torch.equal(x, want)


def test_the_rotation_is_the_same_bits_on_any_shape_and_view():
    """What the cache recorded at quantize time is what a step reads: the rotation of one token alone, of a batch,
    and dequantize_into a strided view give the same bits."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 64, generator=gen) * 5
    for name in ("int3_t64_h", "lm4_t64_h"):
        fmt = by_name(name)
        p, vals = quantize_values(x, fmt)
        assert torch.equal(dequantize(p), vals)
        one, v1 = quantize_values(x[:, :, 7:8], fmt)
        assert torch.equal(v1, vals[:, :, 7:8])
        big = torch.full((2, 3, 50, 64), float("nan"))
        dst = big[:, :, 5:45]
        dequantize_into(p, dst)
        assert torch.equal(dst, vals)


@pytest.mark.parametrize("name", ["int4_t64_h", "int3_t64_h", "int2_t64_h", "lm4_t64_h", "lm3_t64_h", "lm2_t64_h"])
@pytest.mark.parametrize("n", [1, 7, 64, 333])
def test_rotated_bytes_equal_the_plan_accounting(name, n):
    fmt = by_name(name)
    p = quantize(torch.randn(1, 3, n, 64), fmt)
    assert p.nbytes * 8 == fmt.segment_bits(n, 64) * 3
    assert fmt.bits_per_element == by_name(name[:-2]).bits_per_element


def test_rotated_formats_exist_only_per_token_and_for_power_of_two_head_dims():
    assert "int3_t64_h" in format_table(64) and "lm3_t128_h" in format_table(128)
    assert not [n for n in format_table(48) if n.endswith("_h")]
    assert not [n for n in format_table(64) if n.endswith("_h") and ("_c" in n or n.startswith(("int8", "fp")))]
    for bad in ("int4_c32_h", "fp16_h", "fp8_e4m3_t64_h", "int4_t64_h_h"):
        with pytest.raises(InputError):
            by_name(bad)
