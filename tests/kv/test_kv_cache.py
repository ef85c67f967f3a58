"""MixedPrecisionCache with model.generate, and the evaluation's teacher-forced pass against real decoding."""

import warnings
from fractions import Fraction

import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.evaluation import WindowStats, head_bounds, plan_attention
from hnfverify.kv.cache import MixedPrecisionCache
from hnfverify.models import tiny_model
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.texts import TokenWindows
from tests.helpers import decode_logits

T = 64


@pytest.fixture(scope="module")
def tiny():
    lm = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(5)
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, T), generator=g).tolist(), 1)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8, fisher_tokens=0))
    summary = {"shape": res.meta["shape"], "rule_grid": res.meta["rule_grid"],
               "analysis": {**res.meta["options"]}, "calibration": wins.identity(), "model": lm.identity(),
               "arrays": {"sha256": "0" * 64}}
    summary["model"] = {k: str(v) for k, v in summary["model"].items()}
    return lm, summary, res.arrays


def _plan(tiny, **kw):
    lm, summary, arrays = tiny
    kw.setdefault("sink", 4)
    kw.setdefault("recent", 16)
    return plan_from_report(summary, arrays, PlanRequest(**kw))


def test_all_fp32_plan_reproduces_dynamic_cache_exactly(tiny):
    lm = tiny[0]
    plan = _plan(tiny, uniform="fp32")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)
    ref = lm.model.generate(ids, **kw)
    got = lm.model.generate(ids, cache=MixedPrecisionCache.from_plan(plan, lm.model), **kw)
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.logits, got.logits):
        assert torch.equal(a, b)


def test_teacher_forced_evaluation_equals_token_by_token_decoding(tiny):
    lm = tiny[0]
    plan = _plan(tiny, avg_bits=Fraction(6))
    fmts = {plan["layers"][0]["heads"][0][kv][s]["format"] for kv in "KV" for s in ("sink", "recent", "rest")}
    assert len(fmts) > 1 or "fp32" not in fmts
    prefix = 24
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(2))
    bounds, _, _ = head_bounds(plan)
    with torch.no_grad():
        st = WindowStats()
        with plan_attention(lm.model, plan, prefix, bounds, st):
            tf = lm.model(input_ids=ids, use_cache=False).logits[0, prefix - 1:T - 1]
        cache = MixedPrecisionCache.from_plan(plan, lm.model)
        dec = decode_logits(lm.model, cache, ids, prefix)
        lm.model(input_ids=ids[:, T - 1:T], cache=cache, use_cache=True)       # the cache now holds T positions
    assert torch.allclose(tf, dec, atol=2e-5, rtol=1e-4), float((tf - dec).abs().max())
    assert st.violations == 0 and st.checked > 0
    # the cache holds exactly the bytes the plan accounts for at max_seq_len (T)
    accounted = int(Fraction(plan["claims"]["cache_bits_at_max_seq_len"])) / 8
    assert abs(cache.nbytes() - accounted) <= 0.01 * accounted, (cache.nbytes(), accounted)


def test_generate_sampling_batch_and_beams(tiny):
    lm = tiny[0]
    plan = _plan(tiny, avg_bits=Fraction(6))
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)                         # equal lengths: padded batches are refused (below)
    for kw in (dict(do_sample=True, top_k=20), dict(do_sample=False, num_beams=3), dict(do_sample=False)):
        torch.manual_seed(0)
        cache = MixedPrecisionCache.from_plan(plan, lm.model)
        out = lm.model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=24, pad_token_id=0, **kw)
        assert out.shape[0] == 2 and out.shape[1] == 12 + 24
        assert cache.nbytes() > 0


def _generate(lm, cache, ids, **kw):
    torch.manual_seed(0)
    return lm.model.generate(ids, cache=cache, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("kw", [dict(do_sample=False, max_new_tokens=256), dict(do_sample=False, num_beams=3,
                                                                               max_new_tokens=40)])
def test_generate_equals_the_reference_cache(tiny, kw):
    """The fast layout (docs/design.md §4.2) decodes exactly as the cache that stores every chunk as it comes
    (tests/kv/reference_cache.py): the same tokens over 256 greedy steps (and with beams), logits within
    1e-4 (they are in fact identical: the stored values are bit for bit the same)."""
    from tests.kv.reference_cache import MixedPrecisionCache as ReferenceCache

    lm = tiny[0]
    plan = _plan(tiny, avg_bits=Fraction(9, 2))
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():                      # 256 steps run past the plan's max_seq_len (64)
        warnings.simplefilter("ignore", UserWarning)
        fast = _generate(lm, MixedPrecisionCache.from_plan(plan, lm.model, on_overflow="warn"), ids, **kw)
        ref = _generate(lm, ReferenceCache.from_plan(plan, lm.model, on_overflow="warn"), ids, **kw)
    assert torch.equal(fast.sequences, ref.sequences)
    worst = max(float((a - b).abs().max()) for a, b in zip(fast.logits, ref.logits))
    assert worst <= 1e-4, worst


def test_plan_and_model_shapes_must_match(tiny):
    from transformers import LlamaConfig

    from hnfverify.errors import InvalidArgument

    from transformers import AutoModelForCausalLM

    plan = _plan(tiny, uniform="fp16")
    cfg = LlamaConfig(**{**tiny[0].model.config.to_dict(), "num_key_value_heads": tiny[0].model.config.num_attention_heads})
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(InvalidArgument, match="kv_heads|config_sha256|weights_sha256"):
        MixedPrecisionCache.from_plan(plan, other)
    with pytest.raises(InvalidArgument, match="takes the model"):
        MixedPrecisionCache.from_plan(plan, tiny[0].model.config)


def test_eval_and_generate_commands(tiny, tmp_path):
    import io
    import json

    from hnfverify.cli import run
    from hnfverify.core.plan import dumps

    lm = tiny[0]
    plan = _plan(tiny, avg_bits=Fraction(6))
    p = tmp_path / "plan.json"
    p.write_bytes(dumps(plan))

    def cli(*argv):
        out, err = io.StringIO(), io.StringIO()
        return run(list(argv), out, err), out.getvalue(), err.getvalue()

    code, out, err = cli("generate", str(p), "--model", "tiny-llama", "--prompt", "hello", "--max-new-tokens", "8")
    assert code == 0, err
    assert "bits per element" in err
    code, out, err = cli("generate", str(p), "--model", "tiny-llama", "--prompt", "hello", "--max-new-tokens", "8",
                         "--certify")
    assert code == 0, err
    assert "run-time certificate: 8 forward passes" in err and "layer   0:" in err and "monitor" in err, err
    # the tiny model's byte tokenizer: windows of prefix + scored = T positions, as the plan covers
    code, out, err = cli("eval", str(p), "--model", "tiny-llama", "--text", "prose", "--windows", "2",
                         "--prefix", "32", "--scored", "32", "--format", "json", "--quiet")
    assert code == 0, err
    row = json.loads(out.splitlines()[0])
    for k in ("ppl_ref", "ppl", "kld", "top1", "bits_per_element", "compression", "cache_bytes", "bound_violations",
              "bound_over_actual_median", "bound_over_actual_min", "windows", "tokens_scored",
              "runtime_bound_over_actual_median", "runtime_bound_violations"):
        assert k in row
    assert row["windows"] == 2 and row["tokens_scored"] == 64 and row["bound_violations"] == 0
    assert row["runtime_bound_violations"] == 0 and row["runtime_bound_over_actual_median"] >= 1
    assert abs(row["bits_per_element"] - float(Fraction(plan["claims"]["avg_bits"]))) < 0.01 * row["bits_per_element"]
    code, _, err = cli("eval", str(p), "--model", "tiny-llama", "--prefix", "64", "--scored", "64", "--quiet")
    assert code == 2 and "covers 64 positions" in err
    code, _, err = cli("eval", str(p), "--model", "tiny-qwen2", "--prefix", "32", "--scored", "32", "--quiet")
    assert code == 2 and "config_sha256" in err


def test_accounted_bytes_at_max_seq_len_equal_the_plans_claim(tiny):
    from hnfverify.evaluation import accounting_units, accounted_bytes

    plan = _plan(tiny, avg_bits=Fraction(6))
    units = accounting_units(plan)
    t = plan["max_seq_len"]
    from hnfverify.core.semantics import norm_bits

    assert plan["rule"]["error_norms"] == "u8log"            # on by default, and counted
    assert accounted_bytes(units, plan["shape"]["head_dim"], t, norm_bits(plan["rule"])) == \
        int(Fraction(plan["claims"]["cache_bits_at_max_seq_len"])) // 8
    # shorter caches hold fewer bytes
    assert accounted_bytes(units, plan["shape"]["head_dim"], t // 2) < accounted_bytes(units, plan["shape"]["head_dim"], t)


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=False, num_beams=2)])
def test_a_left_padded_batch_decodes_as_each_sequence_alone(tiny, kw):
    """Plan positions are those of each sequence (docs/design.md §4): a left-padded row stores its own tokens
    at positions 0, 1, ... (its pads are never stored), so a padded batch decodes as every row would alone.
    Failed before the fix: the batch was refused (earlier still, the sink held the pads)."""
    lm = tiny[0]
    plan = _plan(tiny, uniform="int2_t16,sink=fp32,recent=int4_t16", sink=4, recent=16)   # where a token sits matters
    rows = [[5, 6, 7], [1, 2, 3, 4, 5, 9, 9, 4], [8, 8, 8, 3, 2]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    gen = dict(max_new_tokens=30, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
    cache = MixedPrecisionCache.from_plan(plan, lm.model)
    batch = lm.model.generate(input_ids=ids, attention_mask=mask, cache=cache, **gen)
    assert len(cache.parts) == 3
    for b, r in enumerate(rows):
        alone = lm.model.generate(input_ids=torch.tensor([r]), cache=MixedPrecisionCache.from_plan(plan, lm.model),
                                  **gen)
        assert torch.equal(batch.sequences[b, width:], alone.sequences[0, len(r):]), b
        if "num_beams" not in kw:
            worst = max(float((x[b] - y[0]).abs().max()) for x, y in zip(batch.logits, alone.logits))
            assert worst <= 1e-4, (b, worst)


def test_position_ids_that_skip_are_refused(tiny):
    from hnfverify.errors import InvalidArgument

    lm = tiny[0]
    cache = MixedPrecisionCache.from_plan(_plan(tiny, uniform="fp16"), lm.model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(InvalidArgument, match="position ids"):
        lm.model(input_ids=ids, position_ids=torch.tensor([[0, 1, 3, 4]]), cache=cache, use_cache=True)


@pytest.mark.parametrize("padded", [False, True])
def test_the_real_cache_stays_inside_the_certified_bound(tiny, padded):
    """Decode through MixedPrecisionCache itself (not the teacher-forced pass): at every step, layer and
    query head, the attention output computed from what the cache returned differs from the output on
    the exact K/V of the same pass (what was written into the cache) by at most the certified E_h — also
    for every row of a left-padded batch (each row stored from its own position 0)."""
    from hnfverify.analysis.analyzer import attention_bias
    from hnfverify.analysis.routing import routed_attention

    lm = tiny[0]
    plan = _plan(tiny, avg_bits=Fraction(9, 2))
    bounds, _, _ = head_bounds(plan)
    cache = MixedPrecisionCache.from_plan(plan, lm.model)
    exact, worst, checked = {}, {}, [0]
    for li, layer in enumerate(cache.layers):
        def update(k, v, *a, _orig=layer.update, _li=li, **kw):
            prev = exact.get(_li)
            exact[_li] = (k, v) if prev is None else (torch.cat([prev[0], k], -2), torch.cat([prev[1], v], -2))
            return _orig(k, v, *a, **kw)
        layer.update = update

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        li = int(module.layer_idx)
        g = query.shape[1] // key.shape[1]
        bias = attention_bias(attention_mask, query, key, module).double()
        tau = float(scaling if scaling is not None else module.scaling)

        def out(k, v):
            k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
            return torch.softmax(tau * query.double() @ k.transpose(-1, -2) + bias, -1) @ v

        o_cache = out(key, value)
        if query.shape[-2] == 1 and key.shape[-2] > 1:            # decode steps read stored K/V
            err = (o_cache - out(*exact[li])).norm(dim=-1).amax(0)[:, 0]     # (Hq,), worst row
            for qh in range(err.shape[0]):
                h = qh // g
                worst[(li, h)] = max(worst.get((li, h), 0.0), float(err[qh]))
                checked[0] += 1
        return o_cache.to(query.dtype).transpose(1, 2).contiguous(), None

    ids = torch.randint(1, 256, (2 if padded else 1, 24), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :7], mask[1, :7] = 0, 0                             # row 1: 7 pads, 17 tokens
    with torch.no_grad(), routed_attention(lm.model, attn):
        lm.model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=T - 24, do_sample=False,
                          pad_token_id=0)
    assert len(cache.parts) == (2 if padded else 1)
    assert checked[0] > 0 and any(w > 0 for w in worst.values())
    over = {k: (w, bounds[k]) for k, w in worst.items() if w > bounds[k]}
    assert not over, over
