import math

import numpy as np
import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.errors import InvalidArgument
from hnfverify.models import LoadedModel, tiny_model
from hnfverify.analysis.report import load, lookup, save
from hnfverify.texts import TokenWindows
from tests.helpers import independent_qkv, naive_kappa


def _windows(n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TokenWindows("random", "file", torch.randint(0, 256, (n, t), generator=g).tolist(), 1)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2"])
def test_kappa_matches_independent_computation(kind):
    lm = tiny_model(kind)
    wins = _windows(2, 24)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8))
    a = res.arrays
    assert a["kappa_hi"].shape == (4, 2, 24)
    for layer in (0, 2, 3):
        ref = np.zeros((2, 24))
        for w in wins.windows:
            q, k, v, tau = independent_qkv(lm.model, torch.tensor([w]), layer)
            for t in (0, 5, 17, 23):
                ref[:, t] = np.maximum(ref[:, t], naive_kappa(q, k, v, tau, t))
        for t in (0, 5, 17, 23):
            for h in range(2):
                r = ref[h, t]
                assert a["kappa_lo"][layer, h, t] <= r * (1 + 1e-5) + 1e-9
                assert r <= a["kappa_hi"][layer, h, t] * (1 + 1e-5) + 1e-9
                assert a["kappa_hi"][layer, h, t] == pytest.approx(r, rel=1e-4, abs=1e-7)
    assert np.all(a["kappa_v"] == 0)
    assert np.all(a["kappa_lo"] <= a["kappa_hi"])
    assert np.all(a["alpha_max_hi"] <= 1 + 1e-6)
    # the last position is attended only by the last query of each head in the group
    assert np.all(a["n_queries"][:, :, -1] == 2 * 2)       # 2 windows x 2 query heads per KV head
    assert np.all(np.isfinite(a["lipschitz"])) and np.all(a["lipschitz"] > 0)


def test_sliding_window_model_uses_its_mask():
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    lm = LoadedModel(model, None, "tiny-mistral", "random", {})
    wins = _windows(1, 20, seed=2)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=0))
    q, k, v, tau = independent_qkv(model, torch.tensor(wins.windows), 1)
    for t in (0, 7, 19):
        ref = naive_kappa(q, k, v, tau, t, sliding_window=6)
        for h in range(2):
            assert res.arrays["kappa_hi"][1, h, t] == pytest.approx(ref[h], rel=1e-4, abs=1e-7)
    # with a window of 6, position 0 is attended by queries 0..5 only
    assert res.arrays["n_queries"][0, 0, 0] == 6 * 2


def test_seed_curvature_is_selectable_and_differs():
    lm = tiny_model("tiny-llama")
    wins = _windows(1, 16)
    ex = analyze(lm, wins, AnalysisOptions(lipschitz_iters=0))
    sd = analyze(lm, wins, AnalysisOptions(curvature="seed", lipschitz_iters=0))
    assert np.array_equal(ex.arrays["kappa_exact_hi"], sd.arrays["kappa_exact_hi"])
    assert np.array_equal(sd.arrays["kappa_hi"], sd.arrays["kappa_seed"])
    assert not np.allclose(ex.arrays["kappa_hi"], sd.arrays["kappa_hi"])
    with pytest.raises(InvalidArgument, match="--curvature"):
        analyze(lm, wins, AnalysisOptions(curvature="hessian"))


def test_ranges_and_diameters():
    lm = tiny_model("tiny-llama")
    wins = _windows(2, 20)
    res = analyze(lm, wins, AnalysisOptions(channel_group=8, lipschitz_iters=0))
    a = res.arrays
    assert a["k_ch_min"].shape == (4, 2, 3, 16)     # ceil(20 / 8) channel groups
    d = 16
    # the token box diameter can never exceed sqrt(d) times the union range
    assert np.all(a["k_d_token"] <= math.sqrt(d) * (a["k_tok_max"] - a["k_tok_min"]) * (1 + 1e-6))
    assert np.all(a["k_d_token"] > 0) and np.all(a["v_d_channel"] > 0)
    # no divisor of 8 that is a multiple of 8 but 8 itself: no smaller groups
    assert not [k for k in a if "_d_channel_g" in k]
    res = analyze(lm, wins, AnalysisOptions(channel_group=16, lipschitz_iters=0))
    a16 = res.arrays
    assert a16["k_d_channel_g8"].shape == a16["k_d_channel"].shape
    # a group of 8 lies inside one of 16: never wider, and what a direct measure of groups of 8 gives
    assert np.all(a16["k_d_channel_g8"] <= a16["k_d_channel"]) and np.any(a16["k_d_channel_g8"] < a16["k_d_channel"])
    assert np.array_equal(a16["k_d_channel_g8"], a["k_d_channel"]) and np.array_equal(a16["v_d_channel_g8"],
                                                                                      a["v_d_channel"])


def test_rotated_ranges_bound_the_rotated_keys_and_values():
    """The rotated formats' ranges (docs/design.md §2.3c): per position, [rot_min, rot_max] holds every coordinate
    of H K_t and H V_t of every window (recomputed independently), and d_token_h is sqrt(d) times that range."""
    from hnfverify.kv.rotation import sylvester

    lm = tiny_model("tiny-llama")
    wins = _windows(2, 20)
    a = analyze(lm, wins, AnalysisOptions(channel_group=8, lipschitz_iters=0)).arrays
    d = 16
    h = sylvester(d) / math.sqrt(d)
    for li in range(4):
        for w in wins.windows:
            _, k, v, _ = independent_qkv(lm.model, torch.tensor([w]), li)
            for name, x in (("k", k), ("v", v)):
                y = x.double() @ h                                      # (Hkv, T, d)
                assert np.all(a[f"{name}_rot_min"][li] <= y.amin(-1).numpy() + 1e-6)
                assert np.all(a[f"{name}_rot_max"][li] >= y.amax(-1).numpy() - 1e-6)
                width = (y.amax(-1) - y.amin(-1)).numpy() * math.sqrt(d)          # this window's, per position
                assert np.all(a[f"{name}_d_token_h"][li] >= width - 1e-6)
        for name in ("k", "v"):
            amax = np.maximum(-a[f"{name}_tok_min"][li], a[f"{name}_tok_max"][li]).astype(np.float64)
            amax_h = np.maximum(-a[f"{name}_rot_min"][li], a[f"{name}_rot_max"][li])
            assert np.all(amax_h <= math.sqrt(d) * amax * (1 + 1e-6))       # ||H x||_inf <= ||x||_2


def test_report_round_trip_and_lookup(tmp_path):
    lm = tiny_model("tiny-qwen2")
    wins = _windows(1, 12)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=1, lipschitz_tokens=4))
    out = tmp_path / "r.json"
    summary = save(res, lm.identity(), wins.identity(), out)
    s2, arrays = load(out)
    assert s2 == summary
    for k_, v_ in res.arrays.items():
        assert np.array_equal(arrays[k_], v_, equal_nan=True)
    row = lookup(s2, arrays, 3, 1, 7)
    assert row["kappa_hi"] == res.arrays["kappa_hi"][3, 1, 7]
    with pytest.raises(InvalidArgument, match="--position"):
        lookup(s2, arrays, 0, 0, 12)
    # tampering with the arrays is detected
    apath = tmp_path / "r.safetensors"
    blob = bytearray(apath.read_bytes())
    blob[-1] ^= 1
    apath.write_bytes(bytes(blob))
    from hnfverify.errors import InputError

    with pytest.raises(InputError, match="does not match"):
        load(out)


def test_the_statistics_pipeline_adds_every_call_in_order_and_raises_errors():
    from hnfverify.analysis.analyzer import _pipelined

    seen = []
    with _pipelined(seen.append, 1) as sink:
        assert sink is not seen.append                          # a worker beside the caller
        for i in range(50):
            sink(i)
    assert seen == list(range(50))

    def bad(call):
        if call == 3:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        with _pipelined(bad, 1) as sink:
            for i in range(8):
                sink(i)
    with _pipelined(seen.append, 0) as sink:
        assert sink == seen.append                              # no worker


def test_the_analysis_is_the_same_with_one_torch_thread_and_with_the_pipeline():
    lm = tiny_model("tiny-llama")
    wins = _windows(3, 16, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = analyze(lm, wins, AnalysisOptions(lipschitz_iters=3, lipschitz_tokens=8, suffix_iters=0))
        torch.set_num_threads(2)
        two = analyze(lm, wins, AnalysisOptions(lipschitz_iters=3, lipschitz_tokens=8, suffix_iters=0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert one.meta["weights_sha256"] == two.meta["weights_sha256"]
    for f in ("kappa_hi", "kappa_lo", "alpha_max_hi", "mass_alpha_hi", "k_tok_max", "n_queries", "lipschitz",
              "mlp_lipschitz"):
        np.testing.assert_allclose(one.arrays[f], two.arrays[f], rtol=1e-4, atol=1e-12)
