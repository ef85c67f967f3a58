"""Planner properties on synthetic reports, against an exact oracle written independently."""

from fractions import Fraction

import pytest
from hypothesis import assume, given, settings, strategies as st

from hnfverify.errors import InvalidArgument
from hnfverify.core.formats import RotatedFormat, SegmentStats, by_name
from hnfverify.core.plan import dumps, loads
from hnfverify.planning import PlanInfeasible, PlanRequest, plan_from_report
from tests.strategies import fixed_report, reports

SEG = ("sink", "recent", "rest")


def oracle_theorem_violations(summary, arrays, plan):
    """Every (layer, head, K, position): eps >= c kappa_t D_t^2 u, from the report's own per-position
    float64 arrays (exact as Fractions), the plan's formats and its rule lengths."""
    eps, c = Fraction(plan["eps"]), Fraction(plan["c"])
    t_max = plan["max_seq_len"]
    grid = summary["rule_grid"]
    bad = []
    for li, layer in enumerate(plan["layers"]):
        for h, head in enumerate(layer["heads"]):
            rule = head["K"]
            s_len, r_len = rule["sink"]["length"], rule["recent"]["length"]
            ri = grid["windows"].index(plan["rule"]["recent"])
            for t in range(t_max):
                for seg in SEG:
                    if seg == "sink" and t >= s_len or seg != "sink" and t < s_len:
                        continue
                    if seg == "recent" and r_len == 0 or seg == "rest" and t_max - s_len - r_len <= 0:
                        continue
                    if plan["analysis"]["curvature"] == "seed":
                        kap = arrays["kappa_seed"][li, h, t]
                    elif seg == "sink":
                        kap = arrays["kappa_exact_hi"][li, h, t]
                    else:
                        kap = arrays["kappa_near_hi" if seg == "recent" else "kappa_far_hi"][li, ri, h, t]
                    fmt = by_name(rule[seg]["format"])
                    d = Fraction(float(arrays["k_d_channel" if fmt.granularity == "channel" else "k_d_token"][li, h, t]))
                    if isinstance(fmt, RotatedFormat):      # D of the rotated grid at this position (§2.3c)
                        amax = max(-float(arrays["k_tok_min"][li, h, t]), float(arrays["k_tok_max"][li, h, t]))
                        a_h = max(-float(arrays["k_rot_min"][li, h, t]), float(arrays["k_rot_max"][li, h, t]))
                        st_t = SegmentStats(int(summary["shape"]["head_dim"]), d, d,
                                            Fraction(amax), Fraction(float(arrays["k_d_token_h"][li, h, t])),
                                            Fraction(a_h))
                        d = fmt.theorem_diameter(st_t)
                    if eps < c * Fraction(float(kap)) * d ** 2 * fmt.u:
                        bad.append((li, h, seg, t))
    return bad


def _bits_per_unit(plan):
    return {(li, h, kv, s): by_name(hd[kv][s]["format"]).bits_per_element
            for li, layer in enumerate(plan["layers"]) for h, hd in enumerate(layer["heads"])
            for kv in "KV" for s in SEG}


eps_values = st.sampled_from([Fraction(1, 10), Fraction(1), Fraction(5), Fraction(50), Fraction(1000), Fraction(10**6)])


@settings(max_examples=30)
@given(rep=reports(), eps=eps_values, sink=st.sampled_from([0, 1, 4]), recent=st.sampled_from([0, 4, 8]),
       curv=st.sampled_from([None, "seed"]))
def test_eps_plans_satisfy_theorem_at_every_position_and_round_trip(rep, eps, sink, recent, curv):
    summary, arrays = rep
    try:
        plan = plan_from_report(summary, arrays, PlanRequest(eps=eps, sink=sink, recent=recent, curvature=curv))
    except PlanInfeasible:
        return
    assert plan["claims"]["theorem_5_7_violations"] == 0
    assert oracle_theorem_violations(summary, arrays, plan) == []
    assert all(Fraction(x) <= eps for x in plan["claims"]["attention_error_max"])
    b = dumps(plan)
    assert dumps(loads(b)) == b


@settings(max_examples=25)
@given(rep=reports(), pair=st.tuples(eps_values, eps_values))
def test_tightening_eps_never_lowers_any_format(rep, pair):
    summary, arrays = rep
    loose, tight = max(pair), min(pair)
    try:
        p_tight = plan_from_report(summary, arrays, _req(eps=tight))
    except PlanInfeasible:
        return
    p_loose = plan_from_report(summary, arrays, _req(eps=loose))
    bt, bl = _bits_per_unit(p_tight), _bits_per_unit(p_loose)
    assert all(bt[k] >= bl[k] for k in bt), [k for k in bt if bt[k] < bl[k]]


@settings(max_examples=25)
@given(rep=reports(), budgets=st.tuples(st.sampled_from([3, 4, 5, 6, 9, 16, 33]), st.sampled_from([3, 4, 5, 6, 9, 16, 33])))
def test_raising_avg_bits_never_raises_the_bound(rep, budgets):
    summary, arrays = rep
    lo_b, hi_b = sorted(Fraction(b) for b in budgets)
    try:
        p_lo = plan_from_report(summary, arrays, _req(avg_bits=lo_b))
    except PlanInfeasible:
        return
    p_hi = plan_from_report(summary, arrays, _req(avg_bits=hi_b))
    assert Fraction(p_lo["claims"]["avg_bits"]) <= lo_b and Fraction(p_hi["claims"]["avg_bits"]) <= hi_b
    assert Fraction(p_hi["claims"]["end_to_end_bound"]) <= Fraction(p_lo["claims"]["end_to_end_bound"])


@settings(max_examples=15)
@given(rep=reports())
def test_eps_target_is_met_and_uniform_uses_one_format(rep):
    summary, arrays = rep
    base = plan_from_report(summary, arrays, _req(eps=Fraction(10**6)))
    target = Fraction(base["claims"]["end_to_end_bound"]) / 3
    try:
        p = plan_from_report(summary, arrays, _req(eps=Fraction(10**6), eps_target=target))
        assert Fraction(p["claims"]["end_to_end_bound"]) <= target
    except PlanInfeasible as e:
        assert "eps-target" in str(e)
    d = summary["shape"]["head_dim"]
    u = plan_from_report(summary, arrays, _req(uniform=f"int4_t{d}"))
    assert set(_fmt for _fmt in (hd[kv][s]["format"] for layer in u["layers"] for hd in layer["heads"]
                                 for kv in "KV" for s in SEG)) == {f"int4_t{d}"}
    assert Fraction(u["claims"]["avg_bits"]) == Fraction(4) + Fraction(32, d) + Fraction(8, d)          # scale, zero-point, error norm


def test_bad_requests(tmp_path):
    summary, arrays = fixed_report()
    with pytest.raises(InvalidArgument, match="--sink"):
        plan_from_report(summary, arrays, _req(eps=Fraction(1), sink=3))
    with pytest.raises(InvalidArgument, match="give --eps"):
        plan_from_report(summary, arrays, _req())
    with pytest.raises(InvalidArgument, match="--eps must be > 0"):
        plan_from_report(summary, arrays, _req(eps=Fraction(0)))
    with pytest.raises(PlanInfeasible, match="Theorem 5.7 cannot hold"):
        plan_from_report(summary, arrays, _req(eps=Fraction(1, 10**12)))
    with pytest.raises(PlanInfeasible, match="avg-bits"):
        plan_from_report(summary, arrays, _req(avg_bits=Fraction(1)))


def _req(**kw):
    kw.setdefault("sink", 1)
    kw.setdefault("recent", 4)
    return PlanRequest(**kw)
