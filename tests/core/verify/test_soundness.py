"""The classes of false PROVED verdicts and trusted contradictions an outside review found in `check`
(docs/design.md §2.3, §2.5, §3, §4, §5). Each test was run against the code before the fix and failed
there (the docstring says how); after the fix it passes. Torch-free.
"""

import copy
import importlib.util
import io
from fractions import Fraction
from pathlib import Path

import pytest

from hnfverify.cli import run
from hnfverify.core.numbers import fmt_number
from hnfverify.core.plan import dumps

HERE = Path(__file__).resolve().parents[2]


def _synthetic():
    spec = importlib.util.spec_from_file_location("mp", HERE / "data" / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.synthetic_report(0)


def _plan(**kw):
    from hnfverify.planning import PlanRequest, plan_from_report

    summary, arrays = _synthetic()
    kw.setdefault("sink", 4)
    kw.setdefault("recent", 8)
    kw.setdefault("max_seq_len", 40)
    return plan_from_report(summary, arrays, PlanRequest(**kw))


def _check(tmp_path, plan, name="plan.json"):
    p = tmp_path / name
    p.write_bytes(dumps(plan))
    out, err = io.StringIO(), io.StringIO()
    code = run(["check", str(p), "--cert-dir", str(tmp_path / "certs")], out, err)
    return code, out.getvalue() + err.getvalue()


def _set_format(plan, kv, seg, name, layer=0, head=0):
    from hnfverify.core.formats import by_name

    plan["formats"][name] = by_name(name).to_json()
    plan["layers"][layer]["heads"][head][kv][seg]["format"] = name


@pytest.fixture(scope="module")
def eps_plan():
    return _plan(eps=Fraction(50))


def test_planner_plans_pass_check(tmp_path, eps_plan):
    """Control: plans the planner writes (eps, avg-bits, recent 0, channel rest) are PROVED."""
    assert _check(tmp_path, eps_plan)[0] == 0
    for kw in (dict(avg_bits=Fraction(5)), dict(avg_bits=Fraction(9, 2), recent=0),
               dict(uniform="int8_t16,K.rest=int4_c8"), dict(uniform="int4_t16,rest=int2_t16", recent=0)):
        code, out = _check(tmp_path, _plan(**kw))
        assert code == 0, (kw, out)


# ---------------------------------------------------------------------------------------- class 2: domains
@pytest.mark.parametrize("fmt", ["fp16", "int8_t16", "int4_t16", "fp8_e4m3_t16", "fp8_e5m2_t16"])
def test_values_outside_the_format_domain_are_refuted(tmp_path, fmt):
    """Failed before the fix: exit 0 (PROVED) — check never compared amax with FP16's 65504, the
    range of the FP16 scale and zero-point (round trip NaN), in which the error lemmas hold."""
    plan = _plan(uniform="fp16")
    _set_format(plan, "V", "rest", fmt)
    plan["formats"].pop("fp16", None) if fmt != "fp16" and not any(
        s["format"] == "fp16" for la in plan["layers"] for h in la["heads"] for kv in "KV"
        for s in (h[kv]["sink"], h[kv]["recent"], h[kv]["rest"])) else None
    inp = plan["layers"][0]["heads"][0]["V"]["rest"]["inputs"]
    inp["amax"] = ["0", "70000"]
    code, out = _check(tmp_path, plan)
    assert code == 1, out
    assert "V" in out and "domain" in out


# ------------------------------------------------------------------------- class 1: empty recent window
def test_recent_zero_has_no_recent_stage(tmp_path):
    """With --recent 0 nothing is ever read in the recent format: a hand-written INT2 recent format
    with an FP32 rest is stored as FP32 once (docs/design.md §4), so the plan's rest bound is the FP32
    error alone. Failed before the fix in the cache (tests/kv/test_cache_semantics.py); here the check
    must not use the recent format's error for rest at R = 0, and must not demand anything of it."""
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    plan = _plan(uniform="fp32", recent=0)
    _set_format(plan, "K", "recent", "int2_t16")
    res = check_plan(plan, CheckOptions(smt=False))
    ids = {o.id for o in res.obligations}
    assert "precision/L0/H0/K/rest" in ids and not any("recent" in i for i in ids)
    assert res.verdict() == "PROVED"


def test_recent_then_rest_chain_is_checked(tmp_path):
    """A value in the rest passed through the recent format first: Theorem 5.7 must hold for the chain
    (docs/design.md §2.2). Failed before the fix: exit 0 — an INT2 recent window before an FP32 rest was
    checked with FP32's u alone, although every far key really passed through INT2."""
    plan = _plan(uniform="fp32", eps=Fraction(1, 10**3))
    head = plan["layers"][0]["heads"][0]["K"]
    _set_format(plan, "K", "recent", "int2_t16")
    head["recent"]["inputs"]["kappa"] = ["0", "0"]            # near queries are insensitive
    code, out = _check(tmp_path, plan)
    assert code == 1, out
    assert "head 0 K rest" in out or "head 0 K recent-far" in out, out


# -------------------------------------------------------------------- class 3: unchecked runtime states
def test_far_queries_reading_recent_format_are_checked(tmp_path):
    """Positions of an incomplete channel group (and the older positions of a multi-token chunk) are
    read by far queries in their recent format (state RECENT_FAR, docs/design.md §4). Failed before the
    fix: exit 0 — no obligation combined the recent format with the far queries' curvature."""
    plan = _plan(uniform="fp32,K.rest=int8_c8", eps=Fraction(1, 10**4))
    _set_format(plan, "K", "recent", "int4_t16")
    plan["layers"][0]["heads"][0]["K"]["recent"]["inputs"]["kappa"] = ["0", "0"]
    code, out = _check(tmp_path, plan)
    assert code == 1, out
    assert "recent-far" in out, out


def test_channel_group_must_be_the_analysis_group(tmp_path):
    """d_channel was measured over groups of analysis.channel_group tokens. Failed before the fix: exit 0
    for a plan whose rest format groups 32 tokens over an analysis of groups of 8."""
    plan = _plan(uniform="fp32,K.rest=int4_c8")
    for la in plan["layers"]:
        for h in la["heads"]:
            h["K"]["rest"]["format"] = "int4_c32"
    plan["formats"]["int4_c32"] = plan["formats"].pop("int4_c8")
    plan["formats"]["int4_c32"]["group"] = 32
    from hnfverify.core.formats import by_name

    plan["formats"]["int4_c32"] = by_name("int4_c32").to_json()
    code, out = _check(tmp_path, plan)
    assert code == 2 and "channel_group" in out, out


@pytest.mark.parametrize("seg,fmt", [("sink", "int4_c8"), ("recent", "int8_c8"), ("rest", "int4_t8")])
def test_formats_the_cache_cannot_run_are_rejected(tmp_path, seg, fmt):
    """Channel groups in the sink or the recent window, per-token groups other than head_dim: PROVED
    before the fix (exit 0) although the cache cannot store them."""
    plan = _plan(uniform="fp32")
    _set_format(plan, "K", seg, fmt)
    code, out = _check(tmp_path, plan)
    assert code == 2, out


# --------------------------------------------------------------------- class 4: contradictory inputs
def _edit(plan, fn):
    q = copy.deepcopy(plan)
    fn(q)
    return q


CONTRADICTIONS = {
    "q_max below qnorm": lambda p: p["layers"][1]["heads"][0].__setitem__("q_max", "1/1000"),
    "lipschitz below measured x margin": lambda p: p["layers"][0]["lipschitz"].__setitem__("value", "1/2"),
    "lipschitz margin below 1": lambda p: p["layers"][0]["lipschitz"].update(margin="1/2"),
    "K/V sink mismatch": lambda p: p["layers"][0]["heads"][1]["V"]["sink"].__setitem__("length", 1),
    "c = 0": lambda p: p.__setitem__("c", "0"),
    "tau = 0": lambda p: p["layers"][2].__setitem__("tau", "0"),
    "o_proj_norm = 0": lambda p: p["layers"][0]["heads"][0].__setitem__("o_proj_norm", "0"),
    "eps = 0": lambda p: p.__setitem__("eps", "0"),
    "rest length 0": lambda p: p["layers"][0]["heads"][0]["K"]["rest"].__setitem__("length", 0),
    "eps mode with implied eps": lambda p: p.__setitem__("eps_source", "implied"),
    "rule lengths differ from $.rule": lambda p: [h[kv]["recent"].__setitem__("length", 0) or
                                                  h[kv]["recent"].__setitem__("inputs", None)
                                                  for la in p["layers"] for h in la["heads"] for kv in "KV"],
}


@pytest.mark.parametrize("name", sorted(CONTRADICTIONS))
def test_contradictory_plans_are_rejected(tmp_path, eps_plan, name):
    """Failed before the fix: exit 0 (or exit 4) — the checker trusted each contradiction. Now exit 2 with
    the JSON path of the offending field."""
    code, out = _check(tmp_path, _edit(eps_plan, CONTRADICTIONS[name]))
    assert code == 2, (name, out)
    assert "$." in out, out


def test_mode_label_cannot_remove_the_attention_budget(tmp_path, eps_plan):
    """A user's eps is the attention-output budget whatever the mode label says. Failed before the fix:
    relabelling an eps plan whose heads exceed eps as "assigned" gave exit 0."""
    plan = copy.deepcopy(eps_plan)
    for seg in ("recent", "rest"):                          # pushes E_h of L0 H0 above eps
        for key in ("mass_avo", "vo"):
            plan["layers"][0]["heads"][0]["K"][seg]["inputs"][key] = ["0", "1000000"]
    plan["mode"]["kind"] = "assigned"
    code, out = _check(tmp_path, plan)
    assert code == 1 and "attention" in out, out


def test_blocks_are_bounded_with_their_own_inputs(tmp_path, eps_plan):
    """Failed before the fix: exit 0 — a block's format was evaluated on its segment's statistics in
    the attention bound while the precision obligation read the block's own inputs."""
    plan = copy.deepcopy(eps_plan)
    rule = plan["layers"][0]["heads"][0]["V"]
    inputs = copy.deepcopy(rule["rest"]["inputs"])
    inputs["amax"] = ["0", "1000"]
    inputs["d_token"] = ["0", "8000"]
    inputs["d_channel"] = ["0", "8000"]
    _set_format(plan, "V", "rest", rule["rest"]["format"])
    from hnfverify.core.formats import by_name

    plan["formats"]["int2_t16"] = by_name("int2_t16").to_json()
    rule["blocks"] = [{"start": 20, "end": 21, "format": "int2_t16", "inputs": inputs}]
    code, out = _check(tmp_path, plan)
    assert code == 1 and "attention" in out, out


# --------------------------------------------------------------------- class 5: composition and the MLP
def test_composition_includes_the_rest_of_the_block(tmp_path):
    """e_l <= L_l e_(l-1) + sqrt(T) L'_l b_l (docs/design.md §2.5). Failed before the fix: the plan's
    mlp_lipschitz was not part of the law (the schema refused the field: exit 2)."""
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    plan = _plan(eps=Fraction(50), composition="product")
    e1 = check_plan(plan, CheckOptions(smt=False)).end_to_end_bound
    for la in plan["layers"]:
        la["mlp_lipschitz"] = {"measured": "10", "margin": "1", "value": "10"}
    plan["eps_target"] = fmt_number(e1 * 2)
    plan["claims"]["end_to_end_bound"] = None
    plan["claims"]["layer_bounds"] = [None] * len(plan["layers"])
    code, out = _check(tmp_path, plan)
    assert code == 1 and "composition" in out, out


def test_understated_claims_are_refuted(tmp_path, eps_plan):
    """A plan's claimed bounds must be upper bounds of the recomputed ones."""
    plan = copy.deepcopy(eps_plan)
    plan["claims"]["attention_error_max"] = ["1E-20"] * len(plan["layers"])
    code, out = _check(tmp_path, plan)
    assert code == 1 and "claims" in out, out


def test_huge_max_seq_len_is_decided_per_group(tmp_path):
    """Every position of a state has the same inputs: one decision per state. Failed before the fix:
    memory grew with max_seq_len (8 bytes x 4 arrays per position and group: the process was killed for
    memory at 10^8) and the exact fallback ran once per position."""
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    plan = _plan(eps=Fraction(50))
    plan["max_seq_len"] = 10 ** 8
    for la in plan["layers"]:
        for h in la["heads"]:
            for kv in "KV":
                h[kv]["rest"].pop("length", None)
    plan["claims"]["end_to_end_bound"] = None
    plan["claims"]["layer_bounds"] = [None] * len(plan["layers"])
    res = check_plan(plan, CheckOptions(smt=False))
    assert res.entries >= 10 ** 8 and res.entries_exact <= len(res.obligations)
