"""Claims about the real default model (SmolLM2-135M-Instruct). Marked slow; `make test` runs them."""

import numpy as np
import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.analysis.instrument import instrument
from hnfverify.texts import token_windows
from tests.helpers import independent_qkv, naive_kappa

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hnfverify.models import load_model

    return load_model("smollm2", verbose=False)


def test_smollm2_shape(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads) == (30, 3, 9)


def test_instrumented_logits_equal_plain_logits_on_smollm2(smollm2):
    win = token_windows(smollm2.tokenizer, "prose", max_tokens=96, window=96)
    ids = torch.tensor(win.windows)
    with torch.no_grad():
        plain = smollm2.model(ids).logits
        with instrument(smollm2.model, lambda c: None):
            inst = smollm2.model(ids).logits
    assert torch.equal(plain, inst)


def test_kappa_matches_independent_computation_at_picked_positions(smollm2):
    win = token_windows(smollm2.tokenizer, "code", max_tokens=64, window=64)
    res = analyze(smollm2, win, AnalysisOptions(lipschitz_iters=0, suffix_iters=0, fisher_tokens=0))
    a = res.arrays
    assert a["kappa_hi"].shape == (30, 3, 64)
    rng = np.random.default_rng(0)
    picks = [(int(rng.integers(30)), int(rng.integers(3)), int(rng.integers(64))) for _ in range(6)]
    picks.append((29, *np.unravel_index(int(np.argmax(a["kappa_hi"][29])), (3, 64))))
    ids = torch.tensor(win.windows)
    for layer, h, t in picks:
        q, k, v, tau = independent_qkv(smollm2.model, ids, layer)
        ref = naive_kappa(q, k, v, tau, t)[h]
        assert a["kappa_lo"][layer, h, t] <= ref * (1 + 1e-5) + 1e-9, (layer, h, t)
        assert ref <= a["kappa_hi"][layer, h, t] * (1 + 1e-5) + 1e-9, (layer, h, t)


def test_2048_calibration_tokens_fit_in_4_gib(tmp_path):
    """A fresh process analyzing 4 x 512 tokens peaks below 4 GiB resident (model load included). The
    Fisher pass runs over one window instead of the default two: its peak is one window's forward and
    backward, the same for every window."""
    import subprocess
    import sys

    code = ("import resource, sys\n"
            "from hnfverify.cli import run\n"
            f"rc = run(['analyze', '--max-tokens', '2048', '--window', '512', '--quiet', '--threads', '2', "
            f"'--fisher-tokens', '512', '--out', {str(tmp_path / 'r.json')!r}])\n"
            "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rc, peak_kib = (int(x) for x in r.stdout.split()[-2:])
    assert rc == 0
    assert peak_kib < 4 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    import json

    s = json.loads((tmp_path / "r.json").read_text())
    assert s["calibration"]["n_tokens"] == 2048 and s["calibration"]["n_windows"] == 4


def test_real_plan_checks_rechecks_replays_and_a_cheaper_format_is_refuted(smollm2, tmp_path):
    """SmolLM2 end to end on the trusted side: analyze -> plan -> check PROVED -> recheck -> replay;
    then one key segment one format step cheaper than Theorem 5.7 allows -> REFUTED, positions named."""
    import copy
    import io
    import json
    from fractions import Fraction

    from hnfverify.cli import run
    from hnfverify.core.formats import by_name, format_table
    from hnfverify.core.plan import dumps
    from hnfverify.planning import PlanRequest, plan_from_report
    from hnfverify.analysis.report import load, save

    win = token_windows(smollm2.tokenizer, "prose", max_tokens=256, window=256)
    res = analyze(smollm2, win, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=16, suffix_iters=0, fisher_tokens=0))
    save(res, smollm2.identity(), win.identity(), tmp_path / "r.json")
    summary, arrays = load(tmp_path / "r.json")
    plan = plan_from_report(summary, arrays, PlanRequest(eps=Fraction(500), sink=4, recent=64), "r.json")
    p = tmp_path / "plan.json"
    p.write_bytes(dumps(plan))

    def cli(*argv):
        out, err = io.StringIO(), io.StringIO()
        return run(list(argv), out, err), out.getvalue() + err.getvalue()

    code, out = cli("check", str(p), "--cert-dir", str(tmp_path / "certs"))
    assert code == 0, out
    cert = next((tmp_path / "certs").glob("*.cert.json"))
    assert cli("recheck", str(cert), "--plan", str(p))[0] == 0
    for solver in ("z3", "cvc5"):
        code, out = cli("replay", str(tmp_path / "certs"), "--solver", solver)
        assert code == 0 and "0 sat, 0 unknown" in out, out

    # find a key segment whose next cheaper format (same granularity) violates Theorem 5.7
    table = format_table(64, 32)
    eps, c = Fraction(plan["eps"]), Fraction(plan["c"])
    for layer in plan["layers"]:
        for head in layer["heads"]:
            for seg in ("recent", "rest"):
                item = head["K"][seg]
                f = by_name(item["format"])
                cheaper = sorted((g for g in table.values() if g.granularity == f.granularity and
                                  g.bits_per_element < f.bits_per_element), key=lambda g: -g.bits_per_element)
                if not cheaper:
                    continue
                g = cheaper[0]
                inp = item["inputs"]
                dd = Fraction(inp["d_channel" if g.granularity == "channel" else "d_token"][1])
                if eps < c * Fraction(inp["kappa"][1]) * dd * dd * g.u:
                    bad = copy.deepcopy(plan)
                    bad["layers"][layer["layer"]]["heads"][head["kv_head"]]["K"][seg]["format"] = g.name
                    bad["formats"][g.name] = g.to_json()
                    q = tmp_path / "bad.json"
                    q.write_bytes(dumps(bad))
                    code, out = cli("check", str(q), "--cert-dir", str(tmp_path / "c2"))
                    assert code == 1, out
                    t, r = plan["max_seq_len"], plan["rule"]["recent"]
                    last = t - r - 1 if seg == "rest" else t - 2        # REST: [S, T-R); RECENT: [S, T-1)
                    assert f"layer {layer['layer']} head {head['kv_head']} K {seg} positions 4-{last}" in out, out
                    assert "first violation at position 4" in out
                    return
    raise AssertionError("no key segment sits one format step above the theorem's limit")


def test_all_fp32_plan_equals_dynamic_cache_on_smollm2(smollm2, tmp_path):
    from fractions import Fraction  # noqa: F401

    from hnfverify.kv.cache import MixedPrecisionCache
    from hnfverify.planning import PlanRequest, plan_from_report
    from hnfverify.analysis.report import load, save

    win = token_windows(smollm2.tokenizer, "prose", max_tokens=128, window=128)
    res = analyze(smollm2, win, AnalysisOptions(lipschitz_iters=1, lipschitz_tokens=8, suffix_iters=0, fisher_tokens=0))
    save(res, smollm2.identity(), win.identity(), tmp_path / "r.json")
    summary, arrays = load(tmp_path / "r.json")
    plan = plan_from_report(summary, arrays, PlanRequest(uniform="fp32", sink=4, recent=16))
    enc = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    kw = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=smollm2.tokenizer.eos_token_id)
    ref = smollm2.model.generate(**enc, **kw)
    got = smollm2.model.generate(**enc, cache=MixedPrecisionCache.from_plan(plan, smollm2.model), **kw)
    assert torch.equal(ref.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))


def test_runtime_and_plan_time_bounds_hold_on_a_real_window(smollm2, tmp_path):
    """SmolLM2, a 4.5-bit plan from 256 prose calibration tokens, one eval-split window it never saw
    (prefix 128, 128 scored): every scored query of every layer and query head stays inside both the
    plan-time E_h and the run-time bound from the stored forms and their recorded norms (§2.4, §2.4b)."""
    from fractions import Fraction

    from hnfverify.analysis.report import load, save
    from hnfverify.evaluation import evaluate
    from hnfverify.planning import PlanRequest, plan_from_report

    win = token_windows(smollm2.tokenizer, "prose", max_tokens=256, window=256)
    res = analyze(smollm2, win, AnalysisOptions(lipschitz_iters=1, lipschitz_tokens=8, suffix_iters=3,
                                                suffix_tokens=32))
    save(res, smollm2.identity(), win.identity(), tmp_path / "r.json")
    summary, arrays = load(tmp_path / "r.json")
    plan = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(9, 2), sink=4, recent=64), "r.json")
    r = evaluate(smollm2, plan, "prose", windows=1, prefix=128, scored=128)
    n = 30 * 9 * 128
    assert r["attention_outputs_checked"] == r["runtime_attention_outputs_checked"] == n // 3
    assert r["bound_violations"] == 0 and r["runtime_bound_violations"] == 0, r
    assert r["runtime_bound_over_actual_min"] >= 1 and r["runtime_bound_over_actual_median"] < 300, r
    assert r["bound_over_actual_median"] < 1e4
    # the claims about the output (docs/design.md §2.6), and the measured suffix assumptions with the actual
    # injected errors, on text the analysis never saw
    o = r["output"]
    assert r["end_to_end_form"] == "suffix" and o["tokens"] == 128
    for k in ("logit_bound_violations", "kl_bound_violations", "greedy_certified_but_changed",
              "runtime_logit_bound_violations", "runtime_kl_bound_violations", "runtime_greedy_certified_but_changed",
              "suffix_assumption_violations"):
        assert o[k] == 0, (k, o)
    assert o["suffix_assumption_windows"] == 1 and o["suffix_assumption_actual_over_predicted_max"] < 1


def test_fast_cache_decodes_as_the_reference_cache_on_smollm2(smollm2, tmp_path):
    """The fast layout (docs/design.md §4.2) on the real model: 256 greedy steps from a chat prompt with a
    4.5-bit plan (sink 4, recent 16: positions leave the window and channel groups complete all along)
    give the same tokens as the cache that stores each chunk as it comes (tests/kv/reference_cache.py),
    every logit within 1e-4."""
    import warnings
    from fractions import Fraction

    from hnfverify.analysis.report import load, save
    from hnfverify.kv.cache import MixedPrecisionCache
    from hnfverify.planning import PlanRequest, plan_from_report
    from tests.kv.reference_cache import MixedPrecisionCache as ReferenceCache

    win = token_windows(smollm2.tokenizer, "prose", max_tokens=256, window=256)
    res = analyze(smollm2, win, AnalysisOptions(lipschitz_iters=1, lipschitz_tokens=8, suffix_iters=0, fisher_tokens=0))
    save(res, smollm2.identity(), win.identity(), tmp_path / "r.json")
    summary, arrays = load(tmp_path / "r.json")
    plan = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(9, 2), sink=4, recent=16))
    assert len({h[kv][s]["format"] for la in plan["layers"] for h in la["heads"] for kv in "KV"
                for s in ("sink", "recent", "rest")}) > 2
    enc = smollm2.tokenizer("Write a short story about a lighthouse keeper.", return_tensors="pt")
    kw = dict(max_new_tokens=256, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=smollm2.tokenizer.eos_token_id, eos_token_id=None)
    with warnings.catch_warnings():                      # the prompt + 256 runs past max_seq_len 256
        warnings.simplefilter("ignore", UserWarning)
        got = smollm2.model.generate(**enc, cache=MixedPrecisionCache.from_plan(plan, smollm2.model,
                                                                                 on_overflow="warn"), **kw)
        ref = smollm2.model.generate(**enc, cache=ReferenceCache.from_plan(plan, smollm2.model, on_overflow="warn"),
                                     **kw)
    assert got.sequences.shape[1] == enc["input_ids"].shape[1] + 256
    assert torch.equal(got.sequences, ref.sequences)
    worst = max(float((a - b).abs().max()) for a, b in zip(got.logits, ref.logits))
    assert worst <= 1e-4, worst
