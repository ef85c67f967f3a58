"""The KL budget (docs/design.md §2.6, §5): a plan's own max_kl and `check --max-kl`, decided exactly,
recorded in the certificate, re-derived by recheck and replayed by z3 and cvc5."""

import copy
import io
import json
from fractions import Fraction
from pathlib import Path

import pytest

from hnfverify.cli import run
from hnfverify.core.bound import plan_bounds
from hnfverify.core.numbers import fmt_number
from hnfverify.core.planview import view

CORPUS = Path(__file__).resolve().parents[2] / "data" / "planted"


def _plan():
    return json.loads((CORPUS / "kl-at-0.json").read_text())


def _check(tmp_path, plan, *extra):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    out, err = io.StringIO(), io.StringIO()
    code = run(["check", str(p), "--format", "json", "--cert-dir", str(tmp_path / "certs"), *extra], out, err)
    return code, json.loads(out.getvalue()) if out.getvalue().startswith("{") else out.getvalue() + err.getvalue()


def test_plan_kl_bound_is_finite_and_the_suffix_form():
    pb = plan_bounds(view(_plan()))
    assert pb.kl < 1e300 and pb.kl == Fraction(_plan()["max_kl"])
    assert pb.logit * pb.logit / 8 <= pb.kl


@pytest.mark.parametrize("step", ["at", "over"])
def test_check_max_kl_gate(tmp_path, step):
    plan = _plan()
    plan["max_kl"] = None
    pb = plan_bounds(view(plan))
    kl = pb.kl
    plan["eps_target"] = fmt_number(pb.end_to_end)            # the suffix composition obligation, on its bound
    budget = kl if step == "at" else kl * (1 - Fraction(1, 2 ** 60))
    code, res = _check(tmp_path, plan, "--max-kl", fmt_number(budget))
    assert isinstance(res, dict), res
    gate = [o for o in res["obligations"] if o["id"] == "kl/gate"]
    assert len(gate) == 1 and gate[0]["family"] == "kl-budget"
    if step == "over":
        assert code == 1 and gate[0]["verdict"] == "REFUTED"
        assert not list((tmp_path / "certs").glob("*.cert.json")) if (tmp_path / "certs").exists() else True
        return
    assert code == 0 and gate[0]["verdict"] == "PROVED"
    comp = [o for o in res["obligations"] if o["id"] == "composition"]
    assert len(comp) == 1 and comp[0]["verdict"] == "PROVED" and comp[0]["witness"]["form"] == "suffix"
    cert_path, = (tmp_path / "certs").glob("*.cert.json")
    cert = json.loads(cert_path.read_text())
    assert cert["gate"] == {"max_kl": fmt_number(budget)}
    out, err = io.StringIO(), io.StringIO()
    assert run(["recheck", str(cert_path), "--plan", str(tmp_path / "plan.json")], out, err) == 0, out.getvalue()
    for solver in ("z3", "cvc5"):
        out = io.StringIO()
        assert run(["replay", str(cert_path), "--solver", solver], out, io.StringIO()) == 0, out.getvalue()


def test_recheck_rejects_a_lowered_gate(tmp_path):
    """A certificate whose gate budget is edited below the KL bound (and resealed) is rejected."""
    import hashlib

    from hnfverify.core.recheck.base import canonical, pretty
    from hnfverify.core.recheck.certificate import decide

    plan = _plan()
    kl = plan_bounds(view(plan)).kl
    code, _ = _check(tmp_path, plan, "--max-kl", fmt_number(kl))
    assert code == 0
    cert_path, = (tmp_path / "certs").glob("*.cert.json")
    cert = json.loads(cert_path.read_text())
    for edit in ("gate", "witness", "drop"):
        c = copy.deepcopy(cert)
        gate = next(o for o in c["obligations"] if o["id"] == "kl/gate")
        if edit == "gate":
            c["gate"]["max_kl"] = fmt_number(kl / 2)
        elif edit == "witness":
            gate["witness"]["max_kl"] = fmt_number(kl / 2)
        else:
            c["gate"]["max_kl"] = None
        body = {k: v for k, v in c.items() if k != "certificate_sha256"}
        c["certificate_sha256"] = hashlib.sha256(canonical(body)).hexdigest()
        code, msg = decide(pretty(c), (tmp_path / "plan.json").read_bytes())
        assert code == 1, (edit, msg)


def test_max_kl_with_the_product_form_is_refuted(tmp_path):
    """No claim about the logits without the suffix form: any KL budget fails."""
    plan = _plan()
    plan["composition"] = {"form": "product", "remainder": None, "logit_gain": None}
    for la in plan["layers"]:
        la["suffix"] = None
    plan["claims"]["logit_bound"] = plan["claims"]["kl_bound"] = None
    plan["max_kl"] = "1E+300"
    code, res = _check(tmp_path, plan)
    assert code == 1
    kl = next(o for o in res["obligations"] if o["id"] == "kl")
    assert kl["verdict"] == "REFUTED" and kl["witness"]["kl_bound"] is None


def test_a_plan_whose_logit_gain_understates_the_lm_head_is_refused_with_the_model():
    """Gamma is a property of the weights (docs/design.md §2.6): eval, generate and the cache recompute it."""
    import copy as _copy

    from hnfverify.errors import InvalidArgument
    from hnfverify.models import check_plan_matches_model, tiny_model
    from hnfverify.planning import PlanRequest
    from tests.helpers import tiny_plan

    lm = tiny_model("tiny-llama")
    plan = tiny_plan(lm, PlanRequest(uniform="fp16", sink=4, recent=16), windows=1, window=32, lipschitz_iters=1,
                     suffix_iters=2, suffix_tokens=8)
    check_plan_matches_model(plan, lm.model)
    bad = _copy.deepcopy(plan)
    g = Fraction(bad["composition"]["logit_gain"]["value"]) / 2
    bad["composition"]["logit_gain"] = {"measured": fmt_number(g), "margin": "1", "value": fmt_number(g)}
    with pytest.raises(InvalidArgument, match="logit_gain"):
        check_plan_matches_model(bad, lm.model)
