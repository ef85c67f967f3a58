"""The runtime quantizers against the proved error models, and their real bytes against the plan's accounting."""

from fractions import Fraction as F

import pytest
import torch
from hypothesis import given, strategies as st

from hnfverify.core.formats import SegmentStats, by_name
from hnfverify.kv.quant import dequantize, quantize

NAMES_T = ["fp32", "fp16", "bf16", "fp8_e4m3_t{d}", "fp8_e5m2_t{d}", "int8_t{d}", "int4_t{d}", "int3_t{d}", "int2_t{d}",
           "lm4_t{d}", "lm3_t{d}", "lm2_t{d}"]
NAMES_C = ["int8_c{g}", "int4_c{g}", "int3_c{g}", "int2_c{g}", "lm4_c{g}", "lm3_c{g}", "lm2_c{g}"]


def _per_element_bound(fmt, x_group_lo, x_group_hi, amax_group, absx):
    """The lemma of proofs/format_error_models.py for each element (float64 tensors)."""
    name = fmt.name
    if name in ("fp32", "fp16", "bf16"):
        return float(fmt.u) * absx + float(fmt.sub_error)
    if name.startswith("fp8"):
        scale = torch.clamp(amax_group * (1 + 2.0 ** -9) / float(fmt.max_finite), min=2.0 ** -14)
        return (float(fmt.u) + 2.0 ** -21) * absx + float(fmt.sub_error) * (1 + 2.0 ** -21) * scale
    u = float(fmt.u)
    return u * (1 + 2.0 ** -9) * (x_group_hi - x_group_lo) + (u * 2.0 ** -9 + 2.0 ** -20) * amax_group + 2.0 ** -23


tensors = st.tuples(st.integers(1, 2), st.sampled_from([1, 2]), st.sampled_from([32, 64]), st.sampled_from([8, 16, 64]),
                    st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 3000.0]), st.floats(-5, 5), st.integers(0, 2**31 - 1))


@given(spec=tensors, name=st.sampled_from(NAMES_T + NAMES_C), group=st.sampled_from([8, 16, 32]))
def test_roundtrip_error_within_the_proved_model(spec, name, group):
    b, h, n, d, scale, shift, seed = spec
    fmt = by_name(name.format(d=d, g=group))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, h, n, d, generator=gen) * scale + shift * scale).to(torch.float32)
    if fmt.name == "fp16" and x.abs().max() > 65504 or n % max(group, 1) and fmt.granularity == "channel":
        return
    p = quantize(x, fmt)
    y = dequantize(p)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y.double() - x.double()).abs()
    xd = x.double()
    if fmt.granularity == "channel":
        g = xd.reshape(b, h, n // group, group, d)
        lo, hi = g.amin(3, keepdim=True).expand_as(g).reshape_as(xd), g.amax(3, keepdim=True).expand_as(g).reshape_as(xd)
        am = g.abs().amax(3, keepdim=True).expand_as(g).reshape_as(xd)
    else:
        lo, hi = xd.amin(-1, keepdim=True).expand_as(xd), xd.amax(-1, keepdim=True).expand_as(xd)
        am = xd.abs().amax(-1, keepdim=True).expand_as(xd)
    bound = _per_element_bound(fmt, lo, hi, am, xd.abs())
    assert torch.all(err <= bound), float((err - bound).max())
    # the vector bound the verifier uses, from the tensor's own ranges
    d_tok = float(((xd.amax(-1) - xd.amin(-1)) * d ** 0.5).max()) * (1 + 1e-12)
    if fmt.granularity == "channel":
        gg = xd.reshape(b, h, n // group, group, d)
        d_ch = float((gg.amax(3) - gg.amin(3)).norm(dim=-1).max()) * (1 + 1e-12)
    else:
        d_ch = d_tok
    st_ = SegmentStats(d, F(d_tok), F(d_ch), F(float(xd.abs().max())))
    assert float(err.norm(dim=-1).max()) <= float(fmt.l2_error(st_))


@pytest.mark.parametrize("name, n", [("int4_t64", 96), ("int2_t64", 96), ("int8_t64", 96), ("fp8_e4m3_t64", 96),
                                     ("fp16", 96), ("bf16", 96), ("fp32", 96), ("int4_c32", 96), ("int2_c32", 64),
                                     ("int3_t64", 96), ("int3_c32", 96), ("int3_c128", 128), ("lm3_t64", 96),
                                     ("lm2_t64", 40), ("lm4_c64", 128), ("lm3_c128", 256), ("lm2_c32", 96)])
def test_real_bytes_equal_the_plan_accounting(name, n):
    fmt = by_name(name)
    x = torch.randn(1, 3, n, 64)
    p = quantize(x, fmt)
    accounted = float(fmt.segment_bits(n, 64)) / 8 * 3
    assert abs(p.nbytes - accounted) <= 0.01 * accounted, (p.nbytes, accounted)


def test_codebook_codes_are_the_nearest_level_and_beat_the_uniform_grid_on_gaussian_groups():
    """A codebook stores, of its levels, one nearest to (x - z) / s (so within the reach W the lemma uses), and on
    Gaussian data (what the levels were fitted for) its mean squared error is below the uniform grid's."""
    from hnfverify.kv.codecs import code_values
    from hnfverify.kv.quant import unpack_bits

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 128, 64, generator=gen)
    for b in (4, 3, 2):
        fmt = by_name(f"lm{b}_t64")
        p = quantize(x, fmt)
        t = (x - p.zero.float()) / p.scale.float()
        stored = code_values(unpack_bits(p.data, b, 64), fmt)
        levels = torch.tensor([float(v) for v in fmt.levels])
        nearest = (t.unsqueeze(-1) - levels).abs().amin(-1)
        assert torch.allclose((t - stored).abs(), nearest, atol=1e-5)
        assert float(nearest.max()) <= float(fmt.u) * (2 ** b - 1) + 1e-5
        mse = float(((dequantize(p) - x) ** 2).mean())
        mse_uniform = float(((dequantize(quantize(x, by_name(f"int{b}_t64"))) - x) ** 2).mean())
        assert mse < 0.9 * mse_uniform, (b, mse, mse_uniform)


def test_packing_is_lossless_for_codes():
    from hnfverify.kv.quant import pack_bits, unpack_bits

    from hnfverify.core.formats import packed_row_bytes

    for bits in (2, 3, 4, 8):
        for n in (1, 3, 5, 8, 13, 31, 64, 124):     # short channel groups pad to whole bytes
            q = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8)
            p = pack_bits(q, bits)
            assert p.shape[-1] == packed_row_bytes(bits, n)
            assert torch.equal(unpack_bits(p, bits, n), q)
    assert packed_row_bytes(3, 64) == 24 and packed_row_bytes(3, 1) == 2
    for bits in (2, 3, 4):                      # rows and positions of a buffer, as the cache reads them
        q = torch.randint(0, 2**bits, (2, 6, 10, 64), dtype=torch.uint8)
        p = torch.cat([pack_bits(q, bits)] * 3, dim=2)
        assert torch.equal(unpack_bits(p[:, 1:4, 12:17], bits, 64), q[:, 1:4, 2:7])
        assert torch.equal(unpack_bits(p[:, [0, 5, 2]], bits, 64), torch.cat([q] * 3, dim=2)[:, [0, 5, 2]])


@given(name=st.sampled_from(["int3_t{d}", "int3_c{g}", "int4_c{g}", "int2_t{d}", "int8_c{g}", "lm4_t{d}", "lm3_c{g}",
                             "lm2_t{d}", "lm2_c{g}"]),
       kind=st.sampled_from(["constant", "outliers", "zeros", "tiny"]), value=st.floats(-3000, 3000),
       seed=st.integers(0, 2**31 - 1))
def test_roundtrip_within_the_model_on_constant_and_outlier_heavy_vectors(name, kind, value, seed):
    """Degenerate groups (every element equal, all zero, subnormal-sized) and a few huge elements among small
    ones: the round trip stays within the proved l2 model computed from the tensor's own ranges."""
    d, g, n = 64, 32, 64
    fmt = by_name(name.format(d=d, g=g))
    gen = torch.Generator().manual_seed(seed)
    if kind == "constant":
        x = torch.full((1, 2, n, d), value)
    elif kind == "zeros":
        x = torch.zeros(1, 2, n, d)
    elif kind == "tiny":
        x = torch.randn(1, 2, n, d, generator=gen) * 1e-30
    else:
        x = torch.randn(1, 2, n, d, generator=gen) * 0.1
        idx = torch.randint(0, x.numel(), (8,), generator=gen)
        x.view(-1)[idx] = value
    x = x.to(torch.float32)
    y = dequantize(quantize(x, fmt))
    xd = x.double()
    err = (y.double() - xd).norm(dim=-1)
    d_tok = float(((xd.amax(-1) - xd.amin(-1)) * d ** 0.5).max()) * (1 + 1e-12)
    gg = xd.reshape(1, 2, n // g, g, d)
    d_ch = float((gg.amax(3) - gg.amin(3)).norm(dim=-1).max()) * (1 + 1e-12)
    bound = fmt.l2_error(SegmentStats(d, F(d_tok), F(d_ch), F(float(xd.abs().max()))))
    assert float(err.max()) <= float(bound)
