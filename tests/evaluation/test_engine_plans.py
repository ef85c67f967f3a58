"""The engines' KV-cache settings as plans (docs/design.md §2.3d) on a tiny random Llama with head_dim 64 (two
llama.cpp blocks of 32 per head): ``certify-engine``'s plan is PROVED and re-decided by recheck, the real cache
stores every position in the engine's type — bit for bit the plan's one definition of what it reads — in exactly
the engine's bytes, and decoding stays within the run-time and plan-time bounds."""

from fractions import Fraction

import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.analysis.report import load, save
from hnfverify.evaluation import WindowStats, head_bounds, plan_attention
from hnfverify.kv.cache import MixedPrecisionCache
from hnfverify.models import ByteTokenizer, LoadedModel
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.texts import TokenWindows
from tests.helpers import assert_cache_reads_the_plan_forms, recorded_decode_logits

T = 72


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    lm = LoadedModel(model, ByteTokenizer(), "tiny-llama-hd64", "random init, seed 0", {"seed": 0})
    g = torch.Generator().manual_seed(5)
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, T), generator=g).tolist(), 1)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8, fisher_tokens=0))
    d = tmp_path_factory.mktemp("engines")
    save(res, lm.identity(), wins.identity(), d / "r.json")
    summary, arrays = load(d / "r.json")
    return lm, summary, arrays, d


SETTINGS = [("q8_0", "q4_0"), ("q4_1", "q5_0"), ("q5_1", "q8_0"), ("iq4_nl", "iq4_nl")]


@pytest.mark.parametrize("ctk, ctv", SETTINGS)
def test_llama_cpp_setting_is_proved_stored_exactly_and_within_its_bounds(tiny, ctk, ctv):
    from hnfverify.core import recheck
    from hnfverify.core.formats import by_name
    from hnfverify.core.plan import plan_sha256, save_plan
    from hnfverify.core.verify import PROVED, certificate
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    lm, summary, arrays, d = tiny
    # certify-engine's plan, with the run-time certificate's recorded norms on (the test's observer needs them)
    plan = plan_from_report(summary, arrays, PlanRequest(uniform=f"K={ctk},V={ctv}", sink=0, recent=0), "r.json")
    assert {s["format"] for la in plan["layers"] for h in la["heads"] for kv, want in (("K", ctk), ("V", ctv))
            for s in (h[kv]["rest"],) if s["format"] != want} == set()
    path = d / f"{ctk}-{ctv}.json"
    save_plan(plan, path)
    result = check_plan(plan, CheckOptions())
    assert result.verdict() == PROVED
    cert = certificate.build(plan, plan_sha256(plan), path.name, result, CheckOptions())
    code, message = recheck.decide(certificate.write(cert, str(d / "certs")).read_bytes(), path.read_bytes())
    assert code == 0, message

    prefix = 16
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dec, steps, calls = recorded_decode_logits(lm.model, plan, ids, prefix)
    assert assert_cache_reads_the_plan_forms(plan, steps) == len(steps) * (T - 1 - prefix)
    bounds, _, _ = head_bounds(plan)
    for li, err, rt in calls:
        assert bool((rt >= err).all()), (li, float((err - rt).max()))
        assert float(err.max()) <= bounds[(li, 0)]
    assert sum(int((err > 0).sum()) for _, err, _ in calls) > 50
    # the engine's bytes: d / 32 blocks per head and position, plus the recorded norm bytes, nothing else
    cache = MixedPrecisionCache.from_plan(plan, lm.model)
    with torch.no_grad():
        lm.model(input_ids=ids[:, :40], cache=cache, use_cache=True)
    per_pos = sum(by_name(f).bits_per_element * 64 / 8 + 1 for f in (ctk, ctv))      # + 1 byte: the recorded norm
    assert cache.nbytes() == per_pos * 40 * 2 * 1                                  # 2 layers x 1 KV head
    st = WindowStats()
    with torch.no_grad(), plan_attention(lm.model, plan, prefix, bounds, st):
        lm.model(input_ids=ids, use_cache=False)
    assert st.violations == 0 and st.checked > 0


def test_certify_engine_and_export_from_a_report(tiny, run_cli, tmp_path):
    lm, summary, arrays, d = tiny
    rep = str(d / "r.json")
    code, out, err = run_cli(["certify-engine", rep, "--engine", "llama.cpp", "--ctk", "q8_0", "--ctv", "q4_0",
                              "--no-eval", "--out-dir", str(tmp_path / "e")])
    assert code == 0, err
    assert "PROVED" in out and (tmp_path / "e" / "plan.json").exists() and list((tmp_path / "e" / "certs").iterdir())
    import json

    plan = json.loads((tmp_path / "e" / "plan.json").read_text())
    assert plan["claims"]["avg_bits"] == "6.5" and plan["rule"] == {"sink": 0, "recent": 0}
    code, out, err = run_cli(["certify-engine", rep, "--engine", "vllm", "--kv-cache-dtype", "fp8", "--no-eval",
                              "--out-dir", str(tmp_path / "v"), "--format", "json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["verdict"] == "PROVED" and doc["bits_per_element"] == "8"
    # a scale that clips the keys: not safe, exit 1, and no plan claims otherwise
    (tmp_path / "s.json").write_text(json.dumps({"k_scale": 1e-6, "v_scale": 1.0}))
    code, out, err = run_cli(["certify-engine", rep, "--engine", "vllm", "--kv-cache-dtype", "fp8", "--no-eval",
                              "--scales", str(tmp_path / "s.json"), "--out-dir", str(tmp_path / "v2")])
    assert code == 1 and "NOT SAFE" in out and "beyond the format's range" in out
    for bad, needle in (({"k_scale": [1.0]}, "k_scale and v_scale"), ({"k_scale": [1.0], "v_scale": 1.0}, "entries"),
                        ({"k_scale": -1, "v_scale": 1.0}, "positive finite")):
        (tmp_path / "b.json").write_text(json.dumps(bad))
        code, _, err = run_cli(["certify-engine", rep, "--engine", "vllm", "--kv-cache-dtype", "fp8", "--no-eval",
                                "--scales", str(tmp_path / "b.json"), "--out-dir", str(tmp_path / "v3")])
        assert code == 2 and needle in err, err
    code, _, err = run_cli(["certify-engine", rep, "--engine", "llama.cpp", "--ctk", "q8_0", "--no-eval"])
    assert code == 2 and "--ctk and --ctv" in err
    # export: the cheapest pair within a mixed plan's bounds
    p = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(6), sink=4, recent=16), "r.json")
    from hnfverify.core.plan import save_plan

    save_plan(p, tmp_path / "p.json")
    code, out, err = run_cli(["export", str(tmp_path / "p.json"), "--to", "llama.cpp", "--report", rep])
    assert code in (0, 1), err
    assert ("-ctk" in out) == (code == 0)
    code, out, err = run_cli(["export", str(tmp_path / "p.json"), "--to", "vllm", "--report", rep,
                              "--out", str(tmp_path / "kv.json")])
    assert code == 0, err
    doc = json.loads((tmp_path / "kv.json").read_text())          # vLLM's quantization-param schema
    per = doc["kv_cache"]["scaling_factor"]["0"]
    assert doc["kv_cache"]["dtype"] == "float8_e4m3fn" and sorted(per) == ["0", "1"]
    assert all(s > 0 and (s * 2 ** 60).is_integer() for s in per.values())
    code, out, err = run_cli(["certify-engine", rep, "--engine", "vllm", "--kv-cache-dtype", "fp8", "--no-eval",
                              "--scales", str(tmp_path / "kv.json"), "--out-dir", str(tmp_path / "v4")])
    assert code == 0 and "PROVED" in out, err


@pytest.mark.parametrize("setting", ["K=q8_0,V=q4_0", "K=q4_1,V=q5_1", "K=iq4_nl,V=q5_0", "fp8_e4m3_s1",
                                     "K=fp8_e4m3_s0.0625,V=fp8_e4m3_s0.5"])
def test_the_independent_oracle_decides_engine_plans_as_the_gate_does(tiny, setting):
    """tests/oracle.py (stdlib only, written from docs/design.md §2.3d) re-derives the engine formats: it decides the
    gate's verdict on each setting's plan, PROVED as it is and REFUTED one Theorem 5.7 step too tight."""
    import sys
    from pathlib import Path

    from hnfverify.core.verify import PROVED, REFUTED
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import oracle

    lm, summary, arrays, d = tiny
    plan = plan_from_report(summary, arrays, PlanRequest(uniform=setting, sink=0, recent=0), "r.json")
    res = oracle.decide(plan)
    assert res.valid, res.reason
    assert check_plan(plan, CheckOptions()).verdict() == PROVED and res.sound == "PROVED", (res.sound, res.failing())
    # a budget below what one of its Theorem 5.7 obligations needs: both refute it
    tight = plan_from_report(summary, arrays, PlanRequest(uniform=setting, sink=0, recent=0, eps=Fraction(1, 10**6)),
                             "r.json")
    res = oracle.decide(tight)
    assert check_plan(tight, CheckOptions()).verdict() == REFUTED and res.sound == "REFUTED"
