"""The rest of block l after its attention: the map from the attention output to the block output, the block
input fixed (Llama: h_mid -> h_mid + mlp(post_attention_layernorm(h_mid)); OLMo-2's post-norms, Gemma's sandwich
norms and GPT-NeoX's parallel residual have their own, docs/design.md §2.5a). Its measured local Lipschitz
estimate L'_l (Lanczos at the calibration points) is stored in the report as ``mlp_lipschitz`` and written into
each plan layer like the block estimate ``lipschitz``; layers of an unknown structure are refused.

failed before the fix: the analysis had no ``mlp_lipschitz`` (KeyError), ``hnfverify.analysis.lipschitz`` had no
rest-of-block estimate, plans had no per-layer ``mlp_lipschitz`` entry, decoder layers of other shapes
(Gemma3's sandwich norms, Cohere's parallel block, OLMo2's post-norms) were not refused, and
``synthetic_report`` had no such array.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.errors import UnsupportedModel
from hnfverify.models import ByteTokenizer, LoadedModel, tiny_model
from hnfverify.core.numbers import dec_up, fmt_number, parse_number, round_up
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.analysis.report import load, save
from hnfverify.texts import TokenWindows

N_TOK = 6


def _windows(t, n=1, seed=1):
    ids = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed)).tolist()
    return TokenWindows("random", "file", ids, 1)


def _independent_mid(model, ids, layer):
    """h_mid of ``layer`` recomputed from the block's input and its own attention (not via the analyzer's hooks)."""
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        x = hs[layer]
        blk = model.model.layers[layer]
        pos = torch.arange(ids.shape[1])[None]
        a, _ = blk.self_attn(blk.input_layernorm(x), position_embeddings=model.model.rotary_emb(x, pos),
                             attention_mask=None)
        return x + a, hs[layer + 1]


@pytest.mark.parametrize("layer", [0, 2])
def test_estimate_is_within_a_few_percent_of_the_exact_jacobian_norm(layer):
    lm = tiny_model("tiny-llama")
    model = lm.model
    wins = _windows(N_TOK)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=60, lipschitz_tokens=N_TOK))
    est = float(res.arrays["mlp_lipschitz"][layer])
    h_mid, y = _independent_mid(model, torch.tensor(wins.windows), layer)
    blk = model.model.layers[layer]

    def rest(h):
        return h + blk.mlp(blk.post_attention_layernorm(h))

    with torch.no_grad():
        assert torch.allclose(rest(h_mid), y, atol=1e-5)              # the map really is the rest of the block
    jac = torch.autograd.functional.jacobian(rest, h_mid)
    n = h_mid.numel()
    true = float(torch.linalg.matrix_norm(jac.reshape(n, n).double(), ord=2))
    assert est <= true * (1 + 1e-4), (est, true)
    assert est >= 0.97 * true, (est, true)
    # it is not the whole block's estimate
    assert abs(est - float(res.arrays["lipschitz"][layer])) > 1e-3 * est


def test_report_stores_and_hashes_it_and_the_plan_carries_it_like_the_block_estimate(tmp_path):
    lm = tiny_model("tiny-qwen2")
    wins = _windows(64, n=2)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=3, lipschitz_tokens=8))
    m = res.arrays["mlp_lipschitz"]
    assert m.shape == (4,) and m.dtype == np.float64 and np.all(np.isfinite(m)) and np.all(m > 0)
    summary = save(res, lm.identity(), wins.identity(), tmp_path / "r.json")
    assert "mlp_lipschitz" in summary["arrays"]["fields"]
    assert [row["mlp_lipschitz_measured"] for row in summary["layers"]] == [float(x) for x in m]
    summary, arrays = load(tmp_path / "r.json")                     # the arrays file's sha256 covers it
    assert np.array_equal(arrays["mlp_lipschitz"], m)
    for margin in (Fraction(11, 10), Fraction(3, 2)):
        plan = plan_from_report(summary, arrays, PlanRequest(uniform="fp16", sink=4, recent=16,
                                                             lipschitz_margin=margin))
        for li, layer in enumerate(plan["layers"]):
            e = layer["mlp_lipschitz"]
            assert set(e) == {"measured", "margin", "value"} == set(layer["lipschitz"])
            assert e["measured"] == dec_up(float(m[li])) and e["margin"] == layer["lipschitz"]["margin"]
            assert e["value"] == fmt_number(round_up(parse_number(dec_up(float(m[li]))) * margin))
            assert parse_number(e["value"]) >= parse_number(e["measured"]) * margin


def test_no_estimate_when_the_lipschitz_iterations_are_off():
    res = analyze(tiny_model("tiny-llama"), _windows(16), AnalysisOptions(lipschitz_iters=0))
    assert res.arrays["mlp_lipschitz"].shape == (4,) and np.all(np.isnan(res.arrays["mlp_lipschitz"]))


def _other_structure(kind: str):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    cfg = {"gemma3": lambda: tf.Gemma3TextConfig(head_dim=16, sliding_window=8, **common),
           "cohere": lambda: tf.CohereConfig(**common),
           "olmo2": lambda: tf.Olmo2Config(**common),
           "gpt_neox": lambda: tf.GPTNeoXConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                                                use_parallel_residual=True)}[kind]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return LoadedModel(model, ByteTokenizer(), kind, "random", {})


def test_decoder_layers_of_an_unknown_structure_are_refused():
    opts = AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8)
    # a layer with a norm the four structures do not have: refused by its modules, before any work
    lm = tiny_model("tiny-llama")
    lm.model.model.layers[1].post_mlp_norm = torch.nn.Identity()
    with pytest.raises(UnsupportedModel, match="LlamaDecoderLayer has none of the known structures"):
        analyze(lm, _windows(16), opts)
    # modules of the sequential structure, but the layer computes something else: refused on the captured point
    lm = tiny_model("tiny-llama")
    def other(module, args, kwargs, out):                         # y + x / 2
        x = args[0] if args else kwargs["hidden_states"]
        return out + 0.5 * x if torch.is_tensor(out) else (out[0] + 0.5 * x,) + tuple(out[1:])

    lm.model.model.layers[1].register_forward_hook(other, with_kwargs=True)
    with pytest.raises(UnsupportedModel, match="not what the sequential structure computes"):
        analyze(lm, _windows(16), opts)


def _exact_rest_norm(model, ids, layer: int) -> float:
    """||J||_2 of e -> the output of decoder layer ``layer`` when e is added to that layer's attention-module output
    (all positions), from the whole model through forward hooks (not via the analyzer's structures)."""
    from hnfverify.analysis.analyzer import _layer_blocks
    from hnfverify.analysis.instrument import attention_modules
    from hnfverify.analysis.routing import routed_attention

    attn = [m for _, m in attention_modules(model) if int(m.layer_idx) == layer][0]
    box = {}

    def add(module, args, out):
        return (out[0] + box["e"],) + tuple(out[1:]) if isinstance(out, tuple) else out + box["e"]

    def grab(module, args, out):
        box["y"] = out[0] if isinstance(out, tuple) else out

    hooks = [attn.register_forward_hook(add), _layer_blocks(model)[layer].register_forward_hook(grab)]
    try:
        def f(e):
            box["e"] = e
            model(input_ids=ids, use_cache=False)
            return box["y"]

        with routed_attention(model, "eager"):
            e0 = torch.zeros(1, ids.shape[1], model.config.hidden_size)
            jac = torch.autograd.functional.jacobian(f, e0)
    finally:
        for h in hooks:
            h.remove()
    n = e0.numel()
    return float(torch.linalg.matrix_norm(jac.reshape(n, n).double(), ord=2))


@pytest.mark.parametrize("kind, structure", [("olmo2", "post-norm"), ("gemma3", "sandwich"),
                                             ("gpt_neox", "parallel"), ("cohere", "parallel")])
def test_other_structures_estimate_the_exact_rest_of_block_norm(kind, structure):
    """OLMo-2's post-norms, Gemma-3's sandwich norms, GPT-NeoX's parallel residual and Cohere's parallel block on
    one norm: the estimate is within a few percent of (and never above) the exact norm of the attention-output ->
    block-output Jacobian, the block input fixed; for a parallel block that map is a translation, so L' = 1."""
    from hnfverify.analysis.analyzer import _layer_blocks
    from hnfverify.analysis.lipschitz import rest_of_block

    lm = _other_structure(kind)
    assert {rest_of_block(b).kind for b in _layer_blocks(lm.model).values()} == {structure}
    wins = _windows(N_TOK)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=40, lipschitz_tokens=N_TOK))
    ids = torch.tensor(wins.windows)
    for layer in (0, 1):
        est = float(res.arrays["mlp_lipschitz"][layer])
        true = _exact_rest_norm(lm.model, ids, layer)
        assert est <= true * (1 + 1e-4) and est >= 0.97 * true, (kind, layer, est, true)
        if structure == "parallel":
            assert abs(true - 1.0) <= 1e-5 and abs(est - 1.0) <= 1e-5, (est, true)


def test_synthetic_report_provides_the_array():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "make_planted.py"
    spec = importlib.util.spec_from_file_location("make_planted", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary, arrays = mod.synthetic_report()
    m = arrays["mlp_lipschitz"]
    assert m.shape == (summary["shape"]["layers"],) and np.all(m >= 1) and np.all(np.isfinite(m))
