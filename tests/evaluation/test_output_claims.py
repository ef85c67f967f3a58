"""The evaluation's claims about the output (docs/design.md §2.6) on a tiny model and real prose: every
plan-time and run-time logit / KL bound holds on every token, no certified greedy token changed, and the
measured suffix assumptions are checked with the actual injected errors."""

import pytest

from hnfverify.evaluation import evaluate
from hnfverify.models import tiny_model
from hnfverify.planning import PlanRequest
from tests.helpers import tiny_plan


@pytest.mark.parametrize("fmt", ["fp16", "int4_t16"])
def test_output_claims_hold_on_every_token(fmt):
    lm = tiny_model("tiny-llama")
    plan = tiny_plan(lm, PlanRequest(uniform=fmt, sink=4, recent=16), window=96, suffix_iters=8, suffix_tokens=32)
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
