"""--uniform specs, explicit assignments, --objective and null claims (issue 6's planner additions)."""

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from hnfverify.errors import HnfError, InvalidArgument
from hnfverify.core.plan import claim_float, dumps, loads
from hnfverify.planning import PlanRequest, claim_up, parse_uniform, plan_from_report, uniform_format
from hnfverify.core.verify.obligations import check_plan
from tests.strategies import reports
from tests.strategies import fixed_report

SEG = ("sink", "recent", "rest")


def _formats(plan):
    return {(layer["layer"], hd["kv_head"], kv, s): hd[kv][s]["format"]
            for layer in plan["layers"] for hd in layer["heads"] for kv in "KV" for s in SEG}


def test_parse_uniform_precedence_most_specific_wins():
    sel = parse_uniform("fp16, K=int8_t16, rest=int4_t16, K.rest=int4_c8")
    assert uniform_format(sel, "K", "rest") == "int4_c8"
    assert uniform_format(sel, "K", "sink") == "int8_t16"
    assert uniform_format(sel, "V", "rest") == "int4_t16"
    assert uniform_format(sel, "V", "recent") == "fp16"
    sel = parse_uniform(",".join(f"{kv}.{s}=fp32" for kv in "KV" for s in SEG))     # no default needed
    assert uniform_format(sel, "V", "sink") == "fp32"


@pytest.mark.parametrize("spec, msg", [
    ("", "empty item"), ("fp16,,K=fp32", "empty item"), ("fp16,Q=fp32", "unknown selector 'Q'"),
    ("fp16,K=fp32,K=bf16", "given twice"), ("K=fp32", "give a default"), ("fp16,K.middle=fp32", "unknown selector"),
])
def test_parse_uniform_rejects(spec, msg):
    with pytest.raises(InvalidArgument, match=msg):
        parse_uniform(spec)


def test_kivi_style_spec_and_errors():
    summary, arrays = fixed_report()
    d, cg = summary["shape"]["head_dim"], summary["analysis"]["channel_group"]
    spec = f"fp16,K.rest=int4_c{cg},V.rest=int4_t{d}"
    plan = plan_from_report(summary, arrays, PlanRequest(uniform=spec, sink=0, recent=4))
    for (li, h, kv, s), f in _formats(plan).items():
        if s == "rest":
            assert f == (f"int4_c{cg}" if kv == "K" else f"int4_t{d}")
        elif s == "recent":
            assert f == "fp16"
    assert plan["mode"] == {"kind": "uniform", "value": spec,
                            "budget_split": "explicit per-unit formats given by the caller"}
    assert loads(dumps(plan)) == plan
    assert check_plan(plan).verdict() == "PROVED"
    with pytest.raises(InvalidArgument, match="channel-grouped"):
        plan_from_report(summary, arrays, PlanRequest(uniform=f"int4_c{cg}", sink=0, recent=4))
    with pytest.raises(InvalidArgument, match="channel-grouped"):
        plan_from_report(summary, arrays, PlanRequest(uniform=f"fp16,K=int4_c{cg}", sink=0, recent=4))
    with pytest.raises(HnfError, match="unknown format"):
        plan_from_report(summary, arrays, PlanRequest(uniform="fp16,V=int5_t16", sink=0, recent=4))
    with pytest.raises(InvalidArgument, match="cannot be combined"):
        PlanRequest(uniform="fp16", avg_bits=Fraction(4)).validate()
    with pytest.raises(InvalidArgument, match="--objective"):
        PlanRequest(avg_bits=Fraction(4), objective="fastest").validate()


def test_explicit_assignment_is_reproduced_exactly():
    summary, arrays = fixed_report()
    d = summary["shape"]["head_dim"]
    base = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(16), sink=1, recent=4))
    fm = _formats(base)
    # flip a few units to other per-token formats
    flips = {k: ("fp32" if v != "fp32" else f"int8_t{d}") for i, (k, v) in enumerate(sorted(fm.items())) if i % 5 == 0}
    fm.update(flips)
    assign = tuple((li, h, kv, s, f) for (li, h, kv, s), f in sorted(fm.items()))
    plan = plan_from_report(summary, arrays, PlanRequest(assign=assign, sink=1, recent=4))
    assert _formats(plan) == fm
    assert plan["mode"]["kind"] == "assigned"
    assert loads(dumps(plan)) == plan
    assert check_plan(plan).verdict() == "PROVED"
    with pytest.raises(InvalidArgument, match="no format for layer"):
        plan_from_report(summary, arrays, PlanRequest(assign=assign[1:], sink=1, recent=4))


@settings(max_examples=15)
@given(rep=reports(), lo=st.sampled_from([Fraction(3), Fraction(5)]), step=st.sampled_from([Fraction(1), Fraction(4)]))
def test_layers_objective_monotone_in_bits(rep, lo, step):
    """Objective 'layers': raising --avg-bits never raises the sum of the layer bounds it lowers."""
    summary, arrays = rep
    sums = []
    for b in (lo, lo + step):
        try:
            p = plan_from_report(summary, arrays, PlanRequest(avg_bits=b, sink=1, recent=4, objective="layers"))
        except Exception as e:          # noqa: BLE001 - a budget below the cheapest plan is fine
            assert "avg-bits" in str(e)
            return
        assert Fraction(p["claims"]["avg_bits"]) <= b
        assert p["mode"]["budget_split"].startswith("greedy: largest reduction of the sum of the per-layer")
        sums.append(sum(claim_float(x) for x in p["claims"]["layer_bounds"]))
    assert sums[1] <= sums[0] * (1 + 1e-6)


def test_claims_above_the_number_range_are_null():
    assert claim_up(Fraction(10) ** 301) is None
    assert claim_up(Fraction(10) ** 299) is not None
    assert claim_float(None) == float("inf")
    summary, arrays = fixed_report()
    plan = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(16), sink=1, recent=4))
    plan["claims"]["end_to_end_bound"] = None
    plan["claims"]["layer_bounds"][0] = None
    assert loads(dumps(plan)) == plan


@settings(max_examples=15)
@given(rep=reports(), objective=st.sampled_from(["linear", "layers", "end_to_end"]))
def test_every_objective_meets_the_budget_and_checks(rep, objective):
    summary, arrays = rep
    try:
        p = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(12), sink=1, recent=4,
                                                          objective=objective))
    except Exception as e:              # noqa: BLE001 - a budget below the cheapest plan is fine
        assert "avg-bits" in str(e)
        return
    assert Fraction(p["claims"]["avg_bits"]) <= 12
    assert check_plan(p).verdict() == "PROVED"


def _with_sub_group(summary, arrays, big=16, small=8, shrink=0.5):
    """The report as an analysis at channel group ``big`` that also measured groups of ``small`` tokens."""
    import copy

    summary, arrays = copy.deepcopy(summary), dict(arrays)
    summary["analysis"]["channel_group"] = big
    for kv in "kv":
        arrays[f"{kv}_d_channel_g{small}"] = arrays[f"{kv}_d_channel"] * shrink
    return summary, arrays


def test_a_plan_uses_the_diameters_of_its_own_channel_group():
    """docs/design.md §3: a plan's channel formats may use any measured divisor of the analysis' group; the
    plan records the group its d_channel inputs were measured over, and check proves it."""
    summary, arrays = _with_sub_group(*fixed_report())
    d = summary["shape"]["head_dim"]

    def rest_inputs(plan):
        return [hd["K"]["rest"]["inputs"]["d_channel"][1] for layer in plan["layers"] for hd in layer["heads"]]

    wide = plan_from_report(summary, arrays, PlanRequest(uniform=f"fp16,K.rest=int4_c16,V.rest=int4_t{d}", sink=0,
                                                         recent=4))
    narrow = plan_from_report(summary, arrays, PlanRequest(uniform=f"fp16,K.rest=int4_c8,V.rest=int4_t{d}", sink=0,
                                                           recent=4))
    assert wide["analysis"]["channel_group"] == 16 and narrow["analysis"]["channel_group"] == 8
    assert all(Fraction(n) < Fraction(w) for n, w in zip(rest_inputs(narrow), rest_inputs(wide)))
    for p in (wide, narrow):
        assert check_plan(loads(dumps(p))).verdict() == "PROVED"
    searched = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(14), sink=0, recent=4, channel_group=8))
    assert searched["analysis"]["channel_group"] == 8
    assert all(f["group"] == 8 for f in searched["formats"].values() if f["granularity"] == "channel")
    with pytest.raises(InvalidArgument, match="--channel-group 4"):
        plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(14), sink=0, recent=4, channel_group=4))
    # a group the analysis did not measure falls back to the analysis' own (sound: it contains it)
    del arrays["k_d_channel_g8"], arrays["v_d_channel_g8"]
    fallback = plan_from_report(summary, arrays, PlanRequest(uniform=f"fp16,K.rest=int4_c8,V.rest=int4_t{d}", sink=0,
                                                             recent=4))
    assert fallback["analysis"]["channel_group"] == 16 and rest_inputs(fallback) == rest_inputs(wide)
    # a plan whose channel group does not divide the analysis' is refused by the loader (check exits 2)
    bad = loads(dumps(narrow))
    bad["analysis"]["channel_group"] = 12
    with pytest.raises(HnfError, match="does not divide"):
        loads(dumps(bad))
