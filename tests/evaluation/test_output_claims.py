"""The evaluation's claims about the output (docs/design.md §2.6) on a tiny model and real prose: every
plan-time and run-time logit / KL bound holds on every token, no certified greedy token changed, and the
measured suffix assumptions are checked with the actual injected errors."""

import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.evaluation import evaluate
from hnfverify.models import tiny_model
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.texts import TokenWindows


@pytest.mark.parametrize("fmt", ["fp16", "int4_t16"])
def test_output_claims_hold_on_every_token(fmt):
    lm = tiny_model("tiny-llama")
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(5)).tolist(), 1)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8, suffix_iters=8, suffix_tokens=32))
    summary = {"shape": res.meta["shape"], "rule_grid": res.meta["rule_grid"], "analysis": {**res.meta["options"]},
               "calibration": wins.identity(), "model": {k: str(v) for k, v in lm.identity().items()},
               "arrays": {"sha256": "0" * 64}}
    plan = plan_from_report(summary, res.arrays, PlanRequest(uniform=fmt, sink=4, recent=16))
    r = evaluate(lm, plan, "prose", windows=2, prefix=48, scored=48)
    o = r["output"]
    assert o is not None and o["tokens"] == 96 and r["end_to_end_form"] == "suffix"
    for k in ("logit_bound_violations", "kl_bound_violations", "greedy_certified_but_changed",
              "runtime_logit_bound_violations", "runtime_kl_bound_violations", "runtime_greedy_certified_but_changed",
              "suffix_assumption_violations"):
        assert o[k] == 0, (k, o)
    assert o["suffix_assumption_windows"] == 2
    # the run-time claim is finite on the first tokens (few errors yet) and certifies the exactly read one
    assert o["runtime_greedy_certified"] >= 1
    assert o["float_floor_at_exact_positions"] <= o["float_allowance_median"]
