"""llama.cpp's KV-cache types (docs/design.md §2.3d): bit for bit the gguf package's reference quantizers, within
their proved error models, and their real bytes what the accounting counts."""

from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hnfverify.core.formats import SegmentStats, by_name, engine_formats, format_table
from hnfverify.kv.codecs import GgmlCodec, ggml_blocks
from hnfverify.kv.quant import dequantize, quantize

TYPES = ["q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "iq4_nl"]
GGUF_QUANTIZED = TYPES[:5]            # gguf quantizes these; iq4_nl's vectors come from ggml's compiled reference
REF = Path(__file__).resolve().parents[1] / "data" / "ggml" / "reference.npz"


def test_bits_per_element_are_llama_cpps():
    bits = {n: by_name(n).bits_per_element for n in TYPES}
    assert bits == {"q8_0": F(17, 2), "q4_0": F(9, 2), "q5_0": F(11, 2), "q4_1": 5, "q5_1": 6, "iq4_nl": F(9, 2)}
    assert set(engine_formats(64)) == set(TYPES) and engine_formats(48) == {}
    assert not set(TYPES) & set(format_table(64, 32))          # the planner's search never picks them


@pytest.mark.parametrize("name", TYPES)
def test_committed_reference_vectors_reproduced_byte_for_byte(name):
    """tests/data/ggml/reference.npz: made by gguf's quantizers (tests/data/ggml/make_reference.py)."""
    ref = np.load(REF)
    x = torch.from_numpy(ref["x"])
    p = quantize(x, by_name(name))
    assert np.array_equal(ggml_blocks(p).reshape(ref[f"{name}_blocks"].shape), ref[f"{name}_blocks"])
    y = dequantize(p).numpy()
    assert np.array_equal(y.view(np.uint32), ref[f"{name}_values"].view(np.uint32))
    assert p.nbytes == ref[f"{name}_blocks"].nbytes                 # the engine's bytes, no more
    assert p.nbytes * 8 == by_name(name).segment_bits(x.shape[0], x.shape[1])


@pytest.fixture(scope="module")
def iq4_nl_reference(tmp_path_factory):
    """x (n, d) float32 -> ggml's iq4_nl blocks from its reference quantizer compiled here (tests/data/ggml/iq4_nl_ref.c),
    or None where no C compiler is installed (the committed vectors still hold it to those bytes)."""
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        return lambda x: None
    exe = tmp_path_factory.mktemp("iq4") / "iq4_nl_ref"
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-ffp-contract=off", "-o", str(exe), str(REF.parent / "iq4_nl_ref.c"),
                    "-lm"], check=True)

    def run(x):
        raw = subprocess.run([str(exe)], input=x.astype(np.float32).tobytes(), capture_output=True, check=True).stdout
        return np.frombuffer(raw, dtype=np.uint8).reshape(x.shape[0], -1)
    return run


def _element_bound(fmt, xb: torch.Tensor) -> torch.Tensor:
    """The lemma of proofs/format_error_models.py per element of blocks xb (..., 32), float64."""
    a = xb.abs().amax(-1, keepdim=True)
    r = xb.amax(-1, keepdim=True) - xb.amin(-1, keepdim=True)
    c = float(fmt.coefficient) * (1 + 2.0 ** -9)
    if fmt.name == "iq4_nl":                    # proofs/iq4_nl_scale.py: the coefficient holds the FP16 term
        return (float(fmt.coefficient) * a + 2.0 ** -18).expand_as(xb)
    if fmt.symmetric:
        return (c * a + 2.0 ** -18).expand_as(xb)
    return (c * r + (2.0 ** -11 + 2.0 ** -20) * a + 2.0 ** -18).expand_as(xb)


vectors = st.tuples(st.integers(1, 6), st.sampled_from([32, 64, 128]), st.sampled_from([1e-7, 1e-3, 1.0, 40.0, 3000.0]),
                    st.floats(-3, 3), st.sampled_from(["normal", "outlier", "constant", "two-valued"]),
                    st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(spec=vectors, name=st.sampled_from(TYPES))
def test_roundtrip_within_the_proved_model_and_equal_to_gguf(spec, name, iq4_nl_reference):
    import gguf.quants as gq
    from gguf import GGMLQuantizationType as T

    n, d, scale, shift, kind, seed = spec
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * scale + shift * scale
    if kind == "outlier":
        x[:, seed % d] *= 300.0
    elif kind == "constant":
        x[:] = x[:, :1]
    elif kind == "two-valued":
        x = torch.where(x > 0, 1.0, -1.0) * scale
    x = x.to(torch.float32).clamp(-60000, 60000)
    fmt = by_name(name)
    p = quantize(x, fmt)
    y = dequantize(p)
    if name in GGUF_QUANTIZED:
        ref = gq.quantize(x.numpy(), getattr(T, name.upper()))
    else:                                       # ggml's compiled reference (skipped without a C compiler)
        ref = iq4_nl_reference(x.numpy())
    if ref is not None:
        assert np.array_equal(ggml_blocks(p).reshape(ref.shape), ref)
        assert np.array_equal(y.numpy().view(np.uint32), gq.dequantize(ref, getattr(T, name.upper())).reshape(
            y.shape).view(np.uint32))
    xd, err = x.double(), (y.double() - x.double()).abs()
    bound = _element_bound(fmt, xd.unflatten(-1, (d // 32, 32))).flatten(-2)
    assert torch.all(err <= bound), float((err - bound).max())
    # the vector bound the verifier decides, from the tensor's own ranges
    amax = F(float(xd.abs().max()))
    d_tok = F(float(((xd.amax(-1) - xd.amin(-1)) * d ** 0.5).max())) * (1 + F(1, 10**12))
    stats = SegmentStats(d, d_tok, d_tok, amax)
    assert float(err.norm(dim=-1).max()) <= float(fmt.l2_error(stats))


def test_q4_0_clamps_a_full_step_and_the_model_says_so():
    """The element of the other sign at |x| = amax lands on code 2n and is clamped: its error is one step d,
    twice the rounding error — the lemma's coefficient is 1/8, not 1/16."""
    x = torch.tensor([[1.0, -1.0] * 16], dtype=torch.float32)
    y = dequantize(quantize(x, by_name("q4_0")))
    assert float((y - x).abs().max()) == pytest.approx(1 / 8)
    assert by_name("q4_0").coefficient > F(1, 8)


def test_engine_format_names():
    for name in TYPES:
        assert by_name(name).to_json()["family"] == "ggml"
    with pytest.raises(Exception, match="unknown format"):
        by_name("q6_0")


def test_packed_layout_round_trips_through_the_cache_reader():
    x = torch.randn(2, 3, 5, 64)
    for name in TYPES:
        p = quantize(x, by_name(name))
        dst = torch.empty_like(x)
        GgmlCodec.dequantize_into(p, dst)
        assert torch.equal(dst, dequantize(p))


@settings(max_examples=40, deadline=None)
@given(scale_exp=st.integers(-12, 4), mag=st.sampled_from([1e-6, 1e-2, 1.0, 0.999]), seed=st.integers(0, 2**31 - 1))
def test_vllm_fixed_scale_fp8_within_its_lemma_and_refused_beyond_448_s(scale_exp, mag, seed):
    """fp8_e4m3_s<s>: clamp(x / s) cast to e4m3, read as fp8 * s; within (1/16 + 2^-21)|x| + (1 + 2^-21) 2^-10 s
    for |x| <= 448 s, and a segment beyond 448 s is not representable."""
    from hnfverify.core.formats import scaled_e4m3

    s = F(2) ** scale_exp * F(3, 2)
    fmt = scaled_e4m3(s)
    assert by_name(fmt.name) == fmt and fmt.bits_per_element == 8
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(4, 64, generator=gen) * 2 - 1) * mag * 448 * float(s)
    x[0, 0] = 448 * float(s) * mag
    y = dequantize(quantize(x.to(torch.float32), fmt))
    xd = x.to(torch.float32).double()
    bound = (1 / 16 + 2.0 ** -21) * xd.abs() + (1 + 2.0 ** -21) * 2.0 ** -10 * float(s)
    assert torch.all((y.double() - xd).abs() <= bound)
    amax = F(float(xd.abs().max()))
    assert fmt.representable(SegmentStats(64, amax, amax, amax))
    assert not fmt.representable(SegmentStats(64, amax, amax, 448 * s * (1 + F(1, 2**20))))
    with pytest.raises(Exception, match="float32"):
        by_name("fp8_e4m3_s0.1")                      # 0.1 is not a float32 value: the scale must be exact
