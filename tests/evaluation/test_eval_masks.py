"""The evaluation's teacher-forced passes compute the model's own attention: the mask transformers hands to
the attention function (sliding windows, interleaved sliding/full layers) and the module's scaling; any
attention argument they do not implement (soft-capping, attention sinks, dropout) is refused.

failed before the fix: ``plan_attention``'s attention (and the quanto peer's) rebuilt a plain causal mask,
so an all-FP32 plan on a Mistral model with a sliding window of 8, and on Qwen2 / Gemma3 with interleaved
sliding and full layers, did not reproduce the model's own logits (max |difference| 0.45-0.72, not <= 1e-5;
evaluate's PPL off by ~0.9 %); Gemma2's soft-capping, gpt-oss' attention sinks and dropout were silently
dropped instead of refused; the quanto peer emulated sliding-window models (which transformers'
QuantizedCache refuses) with that causal mask (9 failed).
"""

import math

import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.errors import UnsupportedModel
from hnfverify.evaluation import WindowStats, evaluate, head_bounds, plan_attention
from hnfverify.models import ByteTokenizer, LoadedModel
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.analysis.report import load, save
from hnfverify.texts import TokenWindows

T = 64
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def _config(kind: str, **over):
    import transformers as tf

    specific = {
        "mistral": (tf.MistralConfig, dict(sliding_window=WINDOW)),          # every layer slides
        "qwen2": (tf.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                       layer_types=LAYER_TYPES)),            # interleaved sliding / full layers
        # interleaved, and tau = query_pre_attn_scalar^-1/2 != head_dim^-1/2
        "gemma3": (tf.Gemma3TextConfig, dict(sliding_window=WINDOW, layer_types=LAYER_TYPES, head_dim=16,
                                             query_pre_attn_scalar=24)),
        "llama": (tf.LlamaConfig, {}),
        "gemma2": (tf.Gemma2Config, dict(sliding_window=WINDOW, head_dim=16)),   # soft-capping (softcap=50)
        "gpt_oss": (tf.GptOssConfig, dict(sliding_window=WINDOW, head_dim=16, num_local_experts=4,
                                          num_experts_per_tok=2)),           # learned attention sinks (s_aux)
    }
    cls, kw = specific[kind]
    return cls(**{**COMMON, **kw, **over})


def _lm(kind: str, seed: int = 0, attn: str = "sdpa", **over) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind, **over), attn_implementation=attn, dtype=torch.float32)
    model.eval()
    return LoadedModel(model, ByteTokenizer(), f"tiny-{kind}", f"random init, seed {seed}", {"seed": seed})


def _fp32_plan(lm, tmp_path) -> dict:
    """analyze (2 random windows of T) -> report on disk -> --uniform fp32 plan, as the other tiny-model tests do."""
    g = torch.Generator().manual_seed(5)
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, T), generator=g).tolist(), 1)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8, fisher_tokens=0))
    save(res, lm.identity(), wins.identity(), tmp_path / "r.json")
    summary, arrays = load(tmp_path / "r.json")
    return plan_from_report(summary, arrays, PlanRequest(uniform="fp32", sink=4, recent=16), "r.json")


def _teacher_forced_logits(lm, plan, ids, prefix):
    bounds, _, _ = head_bounds(plan)
    st = WindowStats()
    with torch.no_grad(), plan_attention(lm.model, plan, prefix, bounds, st):
        return lm.model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma3"])
def test_all_fp32_plan_reproduces_the_models_own_logits_on_sliding_window_layers(kind, tmp_path):
    lm = _lm(kind)
    plan = _fp32_plan(lm, tmp_path)
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = lm.model(input_ids=ids, use_cache=False).logits
    # the window matters on this model: the same weights under plain causal attention differ clearly
    full = _lm(kind, **({"sliding_window": None} if kind == "mistral" else {"layer_types": ["full_attention"] * 4}))
    full.model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        causal = full.model(input_ids=ids, use_cache=False).logits
    assert float((causal - ref).abs().max()) > 1e-2
    got = _teacher_forced_logits(lm, plan, ids, prefix=24)
    assert float((got - ref).abs().max()) <= 1e-5, float((got - ref).abs().max())


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_evaluate_of_an_all_fp32_plan_gives_the_reference_perplexity(kind, tmp_path):
    lm = _lm(kind)
    plan = _fp32_plan(lm, tmp_path)
    r = evaluate(lm, plan, "prose", windows=1, prefix=32, scored=32)
    assert math.isfinite(r["ppl_ref"]) and r["tokens_scored"] == 32
    assert abs(r["ppl"] / r["ppl_ref"] - 1) <= 1e-6, (r["ppl"], r["ppl_ref"])
    assert r["kld"] <= 1e-9 and r["top1"] == 1.0


@pytest.mark.parametrize("kind, needle", [("gemma2", "soft-capping"), ("gpt_oss", "attention sinks")])
def test_attention_arguments_the_pass_does_not_implement_are_refused(kind, needle, tmp_path):
    plan = _fp32_plan(_lm("llama", head_dim=16), tmp_path)         # same shape: 4 layers, 2 KV heads, d 16
    other = _lm(kind, attn="eager")
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))
    with pytest.raises(UnsupportedModel, match=needle):
        _teacher_forced_logits(other, plan, ids, prefix=16)


def test_dropout_in_training_mode_is_refused(tmp_path):
    lm = _lm("llama", attention_dropout=0.5)
    plan = _fp32_plan(lm, tmp_path)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))
    lm.model.train()
    try:
        with pytest.raises(UnsupportedModel, match="dropout"):
            _teacher_forced_logits(lm, plan, ids, prefix=16)
    finally:
        lm.model.eval()


def test_quanto_peer_refuses_what_transformers_quantized_cache_does_not_compute():
    """transformers' QuantizedCache refuses models with sliding-window layers, so its teacher-forced emulation
    must not quietly emulate it with a plain causal mask there; soft-capping is refused as well."""
    pytest.importorskip("optimum.quanto")
    from hnfverify.evaluation.quanto import quanto_method

    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(5))
    m = quanto_method(4, residual=4, group=16)
    for lm, needle in ((_lm("mistral", seed=1), "sliding"), (_lm("qwen2", seed=1), "sliding"),
                       (_lm("gemma2", attn="eager", layer_types=["full_attention"] * 4), "soft-capping")):
        with pytest.raises(UnsupportedModel, match=needle):
            with torch.no_grad(), m.context(lm.model, 10, WindowStats()):
                lm.model(input_ids=ids, use_cache=False)
