"""The whole pipeline on tiny random configs of each supported architecture: analyze -> plan -> check ->
certificate re-decided by recheck -> MixedPrecisionCache with generate -> teacher-forced evaluation.

Per architecture: an all-FP32 plan decodes exactly as DynamicCache (tokens identical, logits bit for bit; past
a sliding window within 1e-5, as the cache keeps the masked-out positions that DynamicCache drops) and its teacher-forced pass gives the model's own logits; a quantized
plan is PROVED, its certificate CONFIRMED by recheck, and its teacher-forced pass equals token-by-token decoding
with MixedPrecisionCache (the cache returning, bit for bit, the plan's stored forms of the K/V the model gave
it), with no attention output above its plan-time bound; decoding with the real cache under run-time
certification, every attention output stays within its run-time bound and its plan-time bound E_h. Qwen3 (q/k norms on each head) and Phi-3 (fused qkv
projection) join Llama, Mistral and Qwen2 (sliding windows, interleaved with full layers); GPT-NeoX (parallel
residual, partial rotary, LayerNorm), Phi and Cohere (attention and MLP in parallel on one norm; Cohere's
scaled logits), OLMo-2 (post-norms) and Gemma-3 (sandwich norms, local/global layers, head_dim 256, one KV
head) have the other decoder-layer structures of the rest-of-block estimate (docs/design.md §2.5a,
tests/analysis/test_mlp_lipschitz.py).
"""

from fractions import Fraction

import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.analysis.report import load, save
from hnfverify.evaluation import WindowStats, evaluate, head_bounds, plan_attention
from hnfverify.kv.cache import MixedPrecisionCache
from hnfverify.models import ByteTokenizer, LoadedModel
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.texts import TokenWindows
from tests.helpers import assert_cache_reads_the_plan_forms, decode_logits, recorded_decode_logits

T = 64
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0,
              eos_token_id=None, bos_token_id=None)
KINDS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "olmo2", "gemma3", "phi", "cohere"]
SLIDING = {"mistral", "qwen2", "gemma3"}


def _config(kind: str):
    import transformers as tf

    cls, kw = {
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, dict(sliding_window=WINDOW)),
        "qwen2": (tf.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=LAYER_TYPES)),
        "qwen3": (tf.Qwen3Config, dict(head_dim=16)),                 # q_norm / k_norm before RoPE
        "phi3": (tf.Phi3Config, {}),                                  # fused qkv_proj and gate_up_proj
        # parallel residual (the MLP reads the block input), partial rotary, LayerNorm with biases, fused qkv
        "gpt_neox": (tf.GPTNeoXConfig, dict(rotary_pct=0.25, use_parallel_residual=True)),
        "olmo2": (tf.Olmo2Config, {}),                                # post-norms, q/k norms over all heads
        # sandwich norms, local/global interleaved, head_dim 256, one KV head, query_pre_attn_scalar scaling
        "gemma3": (tf.Gemma3TextConfig, dict(head_dim=256, num_key_value_heads=1, sliding_window=WINDOW,
                                             layer_types=LAYER_TYPES, query_pre_attn_scalar=64)),
        "phi": (tf.PhiConfig, dict(partial_rotary_factor=0.5)),     # attention and MLP in parallel on one norm
        "cohere": (tf.CohereConfig, dict(logit_scale=0.5)),         # the same, LayerNorm without bias, scaled logits
    }[kind]
    cfg = {**COMMON, **kw}
    if kind == "gpt_neox":
        cfg.pop("num_key_value_heads")
    return cls(**cfg)


@pytest.fixture(scope="module", params=KINDS)
def arch(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    kind = request.param
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="sdpa", dtype=torch.float32).eval()
    lm = LoadedModel(model, ByteTokenizer(), f"tiny-{kind}", "random init, seed 0", {"seed": 0})
    g = torch.Generator().manual_seed(5)
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, T), generator=g).tolist(), 1)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8, fisher_tokens=0))
    d = tmp_path_factory.mktemp(kind)
    save(res, lm.identity(), wins.identity(), d / "r.json")
    summary, arrays = load(d / "r.json")
    return kind, lm, summary, arrays, d


def _plan(arch, **kw):
    _, _, summary, arrays, _ = arch
    return plan_from_report(summary, arrays, PlanRequest(sink=4, recent=16, **kw), "r.json")


def test_all_fp32_plan_decodes_and_evaluates_as_the_model(arch):
    kind, lm, *_ = arch
    plan = _plan(arch, uniform="fp32")
    ids = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref = lm.model.generate(ids, **kw)
    got = lm.model.generate(ids, cache=MixedPrecisionCache.from_plan(plan, lm.model), **kw)
    assert torch.equal(ref.sequences, got.sequences), kind
    diff = max(float((a - b).abs().max()) for a, b in zip(ref.logits, got.logits))
    if kind in SLIDING:
        # DynamicCache drops what falls out of the window; MixedPrecisionCache still holds it, masked out, so
        # the attention kernel sums over more (zero-weight) positions in another order: within float32 rounding
        assert diff <= 1e-5, (kind, diff)
    else:
        assert diff == 0, (kind, diff)
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(2))
    bounds, _, _ = head_bounds(plan)
    with torch.no_grad():
        own = lm.model(input_ids=ids, use_cache=False).logits
        with plan_attention(lm.model, plan, 24, bounds, WindowStats()):
            tf = lm.model(input_ids=ids, use_cache=False).logits
    assert float((tf - own).abs().max()) <= 1e-5, (kind, float((tf - own).abs().max()))
    r = evaluate(lm, plan, "prose", windows=1, prefix=32, scored=32)
    assert abs(r["ppl"] / r["ppl_ref"] - 1) <= 1e-6 and r["top1"] == 1.0, (kind, r["ppl"], r["ppl_ref"])


def test_quantized_plan_is_proved_rechecked_and_teacher_forced_equals_decoding(arch):
    from hnfverify.core import recheck
    from hnfverify.core.plan import plan_sha256, save_plan
    from hnfverify.core.verify import PROVED, certificate
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    kind, lm, _, _, d = arch
    plan = _plan(arch, avg_bits=Fraction(6))
    assert {s["format"] for h in plan["layers"][0]["heads"] for kv in "KV"
            for s in (h[kv][seg] for seg in ("sink", "recent", "rest"))} != {"fp32"}
    path = d / "plan.json"
    save_plan(plan, path)
    result = check_plan(plan, CheckOptions())
    assert result.verdict() == PROVED, (kind, result.verdict())
    cert = certificate.build(plan, plan_sha256(plan), path.name, result, CheckOptions())
    code, message = recheck.decide(certificate.write(cert, str(d / "certs")).read_bytes(), path.read_bytes())
    assert code == 0, (kind, message)

    prefix = 24
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(3))
    bounds, _, _ = head_bounds(plan)
    st = WindowStats()
    with torch.no_grad():
        with plan_attention(lm.model, plan, prefix, bounds, st):
            tf = lm.model(input_ids=ids, use_cache=False).logits[0, prefix - 1:T - 1]
        dec, steps, calls = recorded_decode_logits(lm.model, plan, ids, prefix)
        own = lm.model(input_ids=ids, use_cache=False).logits[0, prefix - 1:T - 1]
    # the cache returns, bit for bit, the stored forms the plan's one definition names, of the K/V the model gave it
    assert assert_cache_reads_the_plan_forms(plan, steps) == len(steps) * (T - 1 - prefix)
    # the two passes compute the model's K/V in different kernels (one token vs the whole window: ~1e-7 apart);
    # a quantizer is discontinuous, so such a difference may move a stored code by one step (GPT-NeoX, Gemma-3
    # here: 2e-4 and 4e-3 in the logits from that step on). Before any code moves the logits agree to float32
    # rounding, and a moved code is a small part of what the plan's quantization does to the logits.
    diff = (tf - dec).abs().amax(-1)
    assert float(diff[:4].max()) <= 2e-5, (kind, diff.tolist())
    assert float(diff.max()) <= 0.1 * float((tf - own).abs().max()), (kind, float(diff.max()),
                                                                        float((tf - own).abs().max()))
    assert st.violations == 0 and st.checked > 0, kind
    # the real cache, decoding: every attention output within its run-time bound and its plan-time bound E_h
    g = lm.model.config.num_attention_heads // len(plan["layers"][0]["heads"])
    for li, err, rt in calls:
        assert bool((rt >= err).all()), (kind, li, float((err - rt).max()))
        per_kv = err.amax(dim=(0, 2)).reshape(-1, g).amax(-1)
        assert all(float(e) <= bounds[(li, h)] for h, e in enumerate(per_kv)), (kind, li, per_kv.tolist())
    assert sum(int((err > 0).sum()) for _, err, _ in calls) > 100, kind
