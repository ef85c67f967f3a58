"""`hnfverify recheck` must not confirm a wrong certificate (docs/design.md §6).

An outside review found that recheck confirmed certificates for invalid plans (negative inputs, a
duplicated layer hiding a violating one), certificates with every SMT query removed, a REFUTED
obligation, fake tool versions, emptied assumptions, and anything else behind a recomputed
self-hash. Each test below crafts one such case from a genuine PROVED certificate (made in-process
with ``check_plan`` + ``certificate.build``), edits the plan and/or the certificate, recomputes
``certificate_sha256`` so the self-hash stays valid, and asserts REJECTED.

The tests whose docstring says "failed before the fix" were run against the old recheck.py (the
one before the hardening) and failed there: it CONFIRMED the crafted certificate.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from fractions import Fraction
from pathlib import Path

import pytest

from hnfverify.core import recheck
from hnfverify.core.formats import by_name
from hnfverify.core.numbers import fmt_number
from hnfverify.core.plan import dumps
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.core.verify import certificate
from hnfverify.core.verify.obligations import CheckOptions, check_plan

HERE = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers
def _report():
    spec = importlib.util.spec_from_file_location("make_planted", HERE / "data" / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary, arrays = mod.synthetic_report(3)
    summary["shape"]["positions"] = 64
    return summary, arrays


VARIANTS = {
    "eps": dict(eps=Fraction(50), sink=4, recent=8, max_seq_len=24),
    "eps-product": dict(eps=Fraction(50), sink=4, recent=8, max_seq_len=24, composition="product"),
    "eps-target": dict(eps=Fraction(50), eps_target=Fraction(10 ** 9), sink=1, recent=16, max_seq_len=40),
    "avg-bits": dict(avg_bits=Fraction(6), sink=4, recent=8, max_seq_len=24),
    "avg-bits-product": dict(avg_bits=Fraction(6), sink=4, recent=8, max_seq_len=24, composition="product"),
    "recent-0": dict(eps=Fraction(50), sink=4, recent=0, max_seq_len=24),
    "channel-rest": dict(uniform="int8_t16,K.rest=int4_c8,V.rest=int4_t16", sink=1, recent=8, max_seq_len=24),
    # the Hadamard-rotated formats (docs/design.md §2.3c), on ranges implied by ||x|| alone and on measured ones
    "rotated": dict(uniform="int8_t16,K.rest=int3_t16_h,V.rest=lm4_t16_h", sink=1, recent=8, max_seq_len=24),
    "rotated-measured": dict(uniform="lm4_t16_h,K.rest=int3_t16_h,V.rest=lm2_t16_h", sink=4, recent=8,
                             max_seq_len=24),
}
_CACHE: dict = {}


def make_plan(variant="eps-target") -> dict:
    if variant not in _CACHE:
        summary, arrays = _report()
        if variant.endswith("-measured"):
            import numpy as np

            for kv in "kv":
                amax = np.maximum(-arrays[f"{kv}_tok_min"], arrays[f"{kv}_tok_max"]).astype(np.float64) * 0.6
                arrays[f"{kv}_rot_min"], arrays[f"{kv}_rot_max"] = -amax * 0.8, amax
                arrays[f"{kv}_d_token_h"] = amax * 1.8 * 4
        _CACHE[variant] = plan_from_report(summary, arrays, PlanRequest(**VARIANTS[variant]))
    return copy.deepcopy(_CACHE[variant])


def sha(obj) -> str:
    return hashlib.sha256(recheck.canonical(obj)).hexdigest()


def reseal(cert: dict) -> dict:
    """Recompute the self-hash, as anyone can."""
    body = {k: v for k, v in cert.items() if k != "certificate_sha256"}
    cert["certificate_sha256"] = sha(body)
    return cert


def certify(plan: dict) -> dict:
    """The genuine certificate `check` writes for a plan (must be PROVED)."""
    opts = CheckOptions()
    res = check_plan(plan, opts)
    assert res.verdict() == "PROVED", [(o.id, o.verdict, o.reason) for o in res.obligations if o.verdict != "PROVED"]
    return json.loads(json.dumps(certificate.build(plan, sha(plan), "plan.json", res, opts)))   # detached


def forge(plan: dict, fallback: dict | None = None) -> dict:
    """What a checker that trusts the plan would write for it: run check_plan on the (crafted) plan
    without validating it, and mark everything PROVED. Where check_plan refuses the plan, the
    genuine certificate of ``fallback`` re-bound to the crafted plan's sha256 (still a forgery)."""
    opts = CheckOptions()
    try:
        res = check_plan(plan, opts)
    except Exception:
        assert fallback is not None
        cert = certify(fallback)
        cert["plan"]["sha256"] = sha(plan)
        return reseal(cert)
    for o in res.obligations:
        o.verdict, o.reason = "PROVED", ""
    cert = json.loads(json.dumps(certificate.build(plan, sha(plan), "plan.json", res, opts)))
    cert["verdict"] = "PROVED"
    return reseal(cert)


def decide(cert: dict, plan: dict):
    return recheck.decide(certificate.serialize(cert), dumps(plan))


def rejected(cert: dict, plan: dict) -> str:
    code, msg = decide(cert, plan)
    assert code == 1, f"recheck confirmed a wrong certificate: {msg}"
    assert msg.startswith("REJECTED"), msg
    return msg


def obligations(cert, family=None, kv=None):
    return [o for o in cert["obligations"] if (family is None or o["family"] == family)
            and (kv is None or o.get("location", {}).get("kv") == kv)]


def recount(cert):
    """Keep the summary's counts consistent with an edited obligation list (so that only the edit
    under test can be what recheck objects to)."""
    fams: dict = {}
    for o in cert["obligations"]:
        fams[o["family"]] = fams.get(o["family"], 0) + 1
    cert["summary"]["obligations"] = len(cert["obligations"])
    cert["summary"]["by_family"] = dict(sorted(fams.items()))
    return cert


def null_claims(plan):
    """Claims of null (a bound above 1e300) always hold: isolates the obligation under test."""
    cl = plan["claims"]
    cl["layer_bounds"] = [None] * len(cl["layer_bounds"])
    cl["attention_error_max"] = [None] * len(cl["attention_error_max"])
    cl["end_to_end_bound"] = cl["logit_bound"] = cl["kl_bound"] = None
    return plan


# ----------------------------------------------------------------------------- genuine certificates
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_genuine_certificates_are_confirmed(variant):
    plan = make_plan(variant)
    cert = certify(plan)
    code, msg = decide(cert, plan)
    assert code == 0 and msg.startswith("CONFIRMED"), msg


def test_variants_cover_what_they_claim():
    assert make_plan("eps")["eps_source"] == "user"
    assert make_plan("avg-bits")["mode"]["kind"] == "avg_bits"
    assert make_plan("recent-0")["rule"]["recent"] == 0
    assert make_plan("eps-target")["eps_target"] is not None
    ch = make_plan("channel-rest")
    assert any(by_name(h["K"]["rest"]["format"]).granularity == "channel" for layer in ch["layers"]
               for h in layer["heads"])
    assert "d_token_h" not in make_plan("rotated")["layers"][0]["heads"][0]["K"]["rest"]["inputs"]
    rm = make_plan("rotated-measured")["layers"][0]["heads"][0]
    assert rm["K"]["rest"]["format"] == "int3_t16_h" and "amax_h" in rm["V"]["sink"]["inputs"]


def test_unedited_resealed_certificate_is_still_confirmed():
    """Control for the helpers: reseal() alone changes nothing."""
    plan = make_plan()
    assert decide(reseal(certify(plan)), plan)[0] == 0


# ----------------------------------------------------------------------------- 1. plan validation
def test_negative_inputs_are_rejected():
    """Negative o_proj_norm gave a negative end-to-end bound, and recheck CONFIRMED it: it never
    validated the plan it re-derived from. Failed before the fix."""
    base = make_plan()
    plan = copy.deepcopy(base)
    for layer in plan["layers"]:
        for head in layer["heads"]:
            head["o_proj_norm"] = "-1"
    cert = forge(plan, base)
    rejected(cert, plan)


def test_negative_mass_is_rejected():
    """Negative attention masses (an interval [-1, -1/2]) lower the bound below zero. Failed before
    the fix."""
    base = make_plan()
    plan = copy.deepcopy(base)
    for layer in plan["layers"]:
        for head in layer["heads"]:
            for kv in "KV":
                for seg in ("sink", "recent", "rest"):
                    if head[kv][seg]["inputs"] is not None:
                        head[kv][seg]["inputs"]["mass_avo"] = ["-1", "-1/2"]
    rejected(forge(plan, base), plan)


def test_duplicated_layer_entry_cannot_hide_a_violating_one():
    """A violating layer 1 followed by a duplicate of the good layer 1: the old recheck keyed its
    obligations by id, so the duplicate overwrote the violation. Failed before the fix."""
    base = make_plan()
    plan = copy.deepcopy(base)
    bad = plan["layers"][1]
    good = copy.deepcopy(bad)
    k = bad["heads"][0]["K"]["rest"]["inputs"]["kappa"]
    k[1] = fmt_number(Fraction(k[1]) * 10 ** 6)             # Theorem 5.7 fails by far in layer 1
    plan["layers"].append(good)
    cert = forge(plan, base)
    seen, kept = set(), []
    for o in reversed(cert["obligations"]):                 # the last entry per id wins, as it did
        if o["id"] not in seen:
            seen.add(o["id"])
            kept.append(o)
    cert["obligations"] = kept[::-1]
    rejected(reseal(recount(cert)), plan)


def _set(path, value):
    def f(p):
        obj = p
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return f


def _swap_layers(p):
    p["layers"][0], p["layers"][1] = p["layers"][1], p["layers"][0]


def _dup_head(p):
    p["layers"][0]["heads"][1] = copy.deepcopy(p["layers"][0]["heads"][0])


def _gap_head(p):
    p["layers"][0]["heads"][1]["kv_head"] = 2


def _bad_format_entry(p):
    name = next(iter(p["formats"]))
    p["formats"][name]["u"] = "1/1000000"


def _unused_unknown_format(p):
    p["formats"]["int3_t16"] = dict(next(iter(p["formats"].values())))


def _table_missing_format(p):
    name = p["layers"][0]["heads"][0]["V"]["sink"]["format"]
    uses = {h[kv][s]["format"] for layer in p["layers"] for h in layer["heads"] for kv in "KV" for s in
            ("sink", "recent", "rest")}
    assert name in uses
    del p["formats"][name]


def _lo_above_hi(p):
    p["layers"][0]["heads"][0]["V"]["rest"]["inputs"]["alpha"] = ["0.9", "0.5"]


def _tiny_magnitude(p):
    p["layers"][0]["heads"][0]["V"]["rest"]["inputs"]["alpha"] = ["1E-350", "0.5"]


def _bad_grammar(p):
    p["layers"][0]["heads"][0]["V"]["rest"]["inputs"]["vo"] = ["0.1", "1."]


def _float_literal(p):
    p["claims"]["compression_vs_fp16"] = 2.5


def _sink_recent_too_long(p):
    for layer in p["layers"]:
        for h in layer["heads"]:
            for kv in "KV":
                h[kv]["sink"]["length"] = p["max_seq_len"]
                h[kv]["recent"]["length"] = 8
    p["rule"] = {"sink": p["max_seq_len"], "recent": 8}


def _kv_lengths_differ(p):
    p["layers"][0]["heads"][0]["V"]["sink"]["length"] += 1


def _rule_lengths_differ(p):
    p["rule"]["recent"] += 1


def _rest_length_wrong(p):
    p["layers"][0]["heads"][0]["K"]["rest"]["length"] = 3


def _channel_format_in_sink(p):
    f = by_name(f"int8_c{p['analysis']['channel_group']}")
    p["formats"][f.name] = f.to_json()
    p["layers"][0]["heads"][0]["V"]["sink"]["format"] = f.name


def _channel_group_not_a_divisor(p):
    f = by_name(f"int8_c{p['analysis']['channel_group'] + 1}")     # a group straddling two analysis groups
    p["formats"][f.name] = f.to_json()
    p["layers"][0]["heads"][0]["V"]["rest"]["format"] = f.name


def _token_group_not_head_dim(p):
    f = by_name("int8_t8")
    p["formats"][f.name] = f.to_json()
    p["layers"][0]["heads"][0]["V"]["rest"]["format"] = f.name


def _overlapping_blocks(p):
    inputs = copy.deepcopy(p["layers"][0]["heads"][0]["K"]["rest"]["inputs"])
    fmt = p["layers"][0]["heads"][0]["K"]["recent"]["format"]
    p["layers"][0]["heads"][0]["K"]["blocks"] = [
        {"start": 10, "end": 14, "format": fmt, "inputs": inputs},
        {"start": 12, "end": 13, "format": fmt, "inputs": copy.deepcopy(inputs)}]


def _q_max_below_qnorm(p):
    p["layers"][0]["heads"][0]["q_max"] = "1/1000"


def _lipschitz_margin_below_one(p):
    lip = p["layers"][0]["lipschitz"]
    lip["margin"] = "1/2"


def _lipschitz_value_below_product(p):
    lip = p["layers"][0]["lipschitz"]
    lip["value"] = lip["measured"]
    lip["margin"] = "2"


def _eps_source_implied(p):
    p["eps_source"] = "implied"


def _claims_too_short(p):
    p["claims"]["layer_bounds"] = p["claims"]["layer_bounds"][:-1]


def _unknown_top_key(p):
    p["comment"] = "trust me"


def _unknown_inputs_key(p):
    p["layers"][0]["heads"][0]["V"]["rest"]["inputs"]["note"] = ["0", "1"]


def _missing_claims(p):
    del p["claims"]


def _string_length(p):
    p["layers"][0]["heads"][0]["V"]["sink"]["length"] = str(p["layers"][0]["heads"][0]["V"]["sink"]["length"])


def _layers_count(p):
    p["shape"]["layers"] = len(p["layers"]) + 1


def _o_proj_zero(p):
    p["layers"][0]["heads"][0]["o_proj_norm"] = "0"


def _bad_sha(p):
    p["analysis"]["arrays_sha256"] = "xyz"


def _empty_segment_inputs(p):
    p["layers"][0]["heads"][0]["V"]["recent"]["inputs"] = None


INVALID = {
    "layers-out-of-order": _swap_layers,
    "duplicate-head": _dup_head,
    "head-gap": _gap_head,
    "format-entry-differs": _bad_format_entry,
    "unknown-format-name": _unused_unknown_format,
    "format-not-in-table": _table_missing_format,
    "interval-lo-above-hi": _lo_above_hi,
    "magnitude-below-1e-300": _tiny_magnitude,
    "number-grammar": _bad_grammar,
    "float-literal": _float_literal,
    "sink-plus-recent-too-long": _sink_recent_too_long,
    "K-V-lengths-differ": _kv_lengths_differ,
    "rule-lengths-differ": _rule_lengths_differ,
    "rest-length-wrong": _rest_length_wrong,
    "channel-format-in-sink": _channel_format_in_sink,
    "channel-group-not-a-divisor": _channel_group_not_a_divisor,
    "token-group-not-head-dim": _token_group_not_head_dim,
    "overlapping-blocks": _overlapping_blocks,
    "q-max-below-qnorm": _q_max_below_qnorm,
    "lipschitz-margin-below-one": _lipschitz_margin_below_one,
    "lipschitz-value-below-measured-x-margin": _lipschitz_value_below_product,
    "eps-mode-eps-source-implied": _eps_source_implied,
    "claims-wrong-length": _claims_too_short,
    "unknown-top-level-key": _unknown_top_key,
    "unknown-inputs-key": _unknown_inputs_key,
    "missing-required-key": _missing_claims,
    "string-where-integer": _string_length,
    "shape-layers-differs": _layers_count,
    "o-proj-norm-not-positive": _o_proj_zero,
    "malformed-sha256": _bad_sha,
    "empty-segment-inputs-null": _empty_segment_inputs,
    "eps-target-zero": _set(("eps_target",), "0"),
    "c-zero": _set(("c",), "0"),
    "exponent-above-400": _set(("claims", "avg_bits"), "1E+401"),
    "wrong-kind": _set(("kind",), "hnfverify-plan-v2"),
    "bool-max-seq-len": _set(("max_seq_len",), True),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_plan_is_rejected(case):
    """Every §3 rule: recheck re-validates the plan as `check` does. All but four cases failed before
    the fix (the old recheck never validated the plan); duplicate-head, empty-segment-inputs-null,
    eps-target-zero and string-where-integer it rejected already (by accident: a crash or a refuted
    re-derivation)."""
    base = make_plan()
    plan = copy.deepcopy(base)
    INVALID[case](plan)
    assert plan != base
    rejected(forge(plan, base), plan)


def test_mlp_lipschitz_margin_below_one_is_rejected():
    """`mlp_lipschitz` follows the rules of `lipschitz` (§3). Failed before the fix."""
    base = make_plan()
    if "mlp_lipschitz" not in base["layers"][0]:
        for layer in base["layers"]:
            layer["mlp_lipschitz"] = {"measured": "1", "margin": "1", "value": "1"}
    plan = copy.deepcopy(base)
    plan["layers"][0]["mlp_lipschitz"]["margin"] = "1/2"
    rejected(forge(plan, base), plan)


# ----------------------------------------------------------------------------- 2. obligations
def test_certificate_without_smt_queries_and_lemma_is_rejected():
    """Every smt2 text and the lemma removed (counts kept consistent): the old recheck then expected
    no SMT at all. Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["obligations"] = [o for o in cert["obligations"] if o["family"] != "lemma"]
    for o in cert["obligations"]:
        o.pop("smt2", None)
    rejected(reseal(recount(cert)), plan)


def test_lemma_removed_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    cert["obligations"] = [o for o in cert["obligations"] if o["family"] != "lemma"]
    rejected(reseal(recount(cert)), plan)


def test_one_smt_query_removed_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    next(o for o in cert["obligations"] if o["family"] == "precision-lower-bound" and "smt2" in o).pop("smt2")
    rejected(reseal(cert), plan)


def test_refuted_obligation_is_rejected():
    """A REFUTED obligation of the per-position family was skipped unread. Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    o = copy.deepcopy(obligations(cert, "precision-lower-bound", "K")[0])
    o.update(id=o["id"] + "/t0", family="precision-lower-bound-position", verdict="REFUTED")
    o.pop("smt2", None)
    cert["obligations"].append(o)
    rejected(reseal(recount(cert)), plan)


def test_refuted_verdict_on_a_required_obligation_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    obligations(cert, "attention-error-budget")[0]["verdict"] = "REFUTED"
    rejected(reseal(cert), plan)


def test_unknown_verdict_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    obligations(cert, "composition-law")[0]["verdict"] = "UNKNOWN"
    rejected(reseal(cert), plan)


def test_unknown_obligation_is_rejected():
    """An obligation of a family the plan does not imply. Failed before the fix (the old recheck
    skipped the per-position family)."""
    plan = make_plan()
    cert = certify(plan)
    cert["obligations"].append({"id": "anything/goes", "family": "precision-lower-bound-position", "location": {},
                                "verdict": "PROVED", "witness": {}})
    rejected(reseal(recount(cert)), plan)


def test_extra_obligation_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    cert["obligations"].append({"id": "audit/extra", "family": "audit", "location": {}, "verdict": "PROVED",
                                "witness": {}})
    rejected(reseal(recount(cert)), plan)


def test_duplicated_obligation_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    cert["obligations"].append(copy.deepcopy(obligations(cert, "precision-lower-bound")[0]))
    rejected(reseal(recount(cert)), plan)


@pytest.mark.parametrize("family", ["attention-error-budget", "composition-law", "claims"])
def test_missing_family_is_rejected(family):
    """The claims case failed before the fix (the old recheck did not know the family)."""
    plan = make_plan()
    cert = certify(plan)
    before = len(cert["obligations"])
    cert["obligations"] = [o for o in cert["obligations"] if o["family"] != family]
    if family != "claims":      # claims: the old check wrote none, so the old certificate lacks it already
        assert len(cert["obligations"]) < before
    rejected(reseal(recount(cert)), plan)


def test_attention_family_required_when_eps_source_is_user():
    """An avg-bits plan whose eps is the user's: §5.3 requires the attention budget. The old recheck
    keyed it on mode.kind. Failed before the fix."""
    plan = make_plan("avg-bits")
    plan["eps_source"] = "user"
    plan["eps"] = fmt_number(max(Fraction(plan["eps"]),       # the precision bounds and E_h <= eps hold
                                 2 * max(Fraction(x) for x in plan["claims"]["attention_error_max"])))
    cert = forge(plan)
    cert["obligations"] = [o for o in cert["obligations"] if o["family"] != "attention-error-budget"]
    assert "missing" in rejected(reseal(recount(cert)), plan)


def test_missing_recent_far_state_is_rejected():
    """RECENT_FAR is reachable (R >= 1, T - R > S, §4): its obligations are required. The old
    check wrote none, so its certificates lack them. Failed before the fix."""
    plan = make_plan("eps")
    assert plan["rule"]["recent"] >= 1 and plan["max_seq_len"] - plan["rule"]["recent"] > plan["rule"]["sink"]
    cert = certify(plan)
    cert["obligations"] = [o for o in cert["obligations"] if not o["id"].endswith("/recent-far")]
    rejected(reseal(recount(cert)), plan)


def test_witness_field_changed_is_rejected():
    """A witness field the old recheck did not compare (format). Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    o = obligations(cert, "precision-lower-bound", "K")[0]
    o["witness"]["format"] = "fp32"
    rejected(reseal(cert), plan)


def test_extra_witness_key_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    obligations(cert, "precision-lower-bound", "V")[0]["witness"]["note"] = "checked by hand"
    rejected(reseal(cert), plan)


def test_witness_number_in_another_spelling_is_rejected():
    """The witness must be the derivation's exact text, not just an equal number. Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    w = obligations(cert, "precision-lower-bound", "K")[0]["witness"]
    w["eps"] = f"{Fraction(w['eps']).numerator * 2}/{Fraction(w['eps']).denominator * 2}"
    rejected(reseal(cert), plan)


def test_attention_witness_dk_changed_is_rejected():
    """dK / dV of the attention witness were not compared. Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    w = obligations(cert, "attention-error-budget")[0]["witness"]
    seg = sorted(w["dK"])[0]
    w["dK"][seg] = fmt_number(Fraction(w["dK"][seg]) / 2)
    rejected(reseal(cert), plan)


def test_composition_witness_list_changed_is_rejected():
    """Failed before the fix (the old recheck compared three of its fields)."""
    plan = make_plan()
    cert = certify(plan)
    w = obligations(cert, "composition-law")[0]["witness"]
    key = next(k for k, v in sorted(w.items()) if isinstance(v, list))
    w[key] = w[key][::-1] if len(set(w[key])) > 1 else w[key] + ["1"]
    rejected(reseal(cert), plan)


def test_location_changed_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    o = obligations(cert, "precision-lower-bound", "K")[0]
    o["location"]["positions"] = [[a, b + 1] for a, b in o["location"]["positions"]]
    rejected(reseal(cert), plan)


def test_family_changed_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    obligations(cert, "attention-error-budget")[0]["family"] = "lemma"
    rejected(reseal(recount(cert)), plan)


def test_extra_smt_text_on_a_value_obligation_is_rejected():
    """The SMT text must equal the derivation's, also where it implies none. Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    o = obligations(cert, "precision-lower-bound", "V")[0]
    assert "smt2" not in o
    o["smt2"] = "(check-sat)\n"
    rejected(reseal(cert), plan)


def test_smt_text_edited_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    o = next(o for o in cert["obligations"] if o["family"] == "composition-law")
    o["smt2"] = o["smt2"].replace("(check-sat)", "(assert false)\n(check-sat)")
    rejected(reseal(cert), plan)


def test_extra_key_in_an_obligation_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["obligations"][1]["reviewed"] = True
    rejected(reseal(cert), plan)


# ----------------------------------------------------------------------------- semantics (§2, §4)
def test_rest_chain_condition_is_enforced():
    """A rest key exactly on the one-stage Theorem 5.7 boundary of its rest format: the REST chain
    (recent, then rest on widened ranges, §2.2) then exceeds eps. Failed before the fix."""
    plan = null_claims(make_plan("eps"))
    eps, c = Fraction(plan["eps"]), Fraction(plan["c"])
    rest = plan["layers"][0]["heads"][0]["K"]["rest"]
    f = by_name(rest["format"])
    dd = Fraction(rest["inputs"]["d_channel" if f.granularity == "channel" else "d_token"][1])
    rest["inputs"]["kappa"] = ["0", fmt_number(eps / (c * dd * dd * f.u))]
    rejected(forge(plan), plan)


def test_domain_of_every_stage_is_enforced():
    """A value stored in FP16 beyond 65504 (out of the FP16 lemma's domain, §2.3). Failed before the fix."""
    plan = null_claims(make_plan("avg-bits"))
    for name in ("fp16", "bf16"):
        plan["formats"][name] = by_name(name).to_json()
    rule = plan["layers"][0]["heads"][0]["V"]
    assert rule["recent"]["length"] > 0
    rule["recent"]["format"] = "bf16"           # RECENT_FAR (bf16) is in its domain; REST's fp16 stage is not
    rule["rest"]["format"] = "fp16"
    rule["rest"]["inputs"]["amax"] = ["0", "65504"]
    assert "fp16 out of its domain" in rejected(forge(plan), plan)


def test_per_head_bound_uses_the_larger_of_the_k_and_v_masses():
    """V's attention masses far above K's: §2.4 takes the larger; the old bound read K's only.
    Failed before the fix."""
    plan = null_claims(make_plan("eps"))
    for seg in ("sink", "recent", "rest"):
        for key in ("mass_avo", "vo"):        # both branches of the output term (§2.4) grow
            plan["layers"][0]["heads"][0]["V"][seg]["inputs"][key] = ["0", "1000"]
    rejected(forge(plan), plan)


def test_composition_includes_mlp_lipschitz():
    """eps_target between the bound without and with the MLP gains L'_l = 3 (§2.5, product form). Failed before
    the fix."""
    plan = null_claims(make_plan("eps-product"))
    for layer in plan["layers"]:
        layer["mlp_lipschitz"] = {"measured": "1", "margin": "1", "value": "1"}
    e1 = check_plan(plan, CheckOptions(smt=False)).end_to_end_bound
    for layer in plan["layers"]:
        layer["mlp_lipschitz"] = {"measured": "3", "margin": "1", "value": "3"}
    plan["eps_target"] = fmt_number(2 * e1)
    rejected(forge(plan), plan)


def test_understated_claims_are_rejected():
    """The plan claims a far smaller end-to-end bound than its inputs imply (§5.5). Failed before the fix."""
    plan = make_plan()
    plan["claims"]["end_to_end_bound"] = "1/1000"
    rejected(forge(plan), plan)


# ----------------------------------------------------------------------------- 3. certificate body
@pytest.mark.parametrize("key,value", [("hnfverify", "9.9.9"), ("hnfverify", None), ("z3", "fake"),
                                       ("python", ""), ("numpy", "1.0; rm -rf /"), ("cvc5", 5)])
def test_fake_tool_versions_are_rejected(key, value):
    """Failed before the fix (tool versions were never read)."""
    plan = make_plan()
    cert = certify(plan)
    cert["tool"][key] = value
    rejected(reseal(cert), plan)


@pytest.mark.parametrize("key,value", [("z3", "0.0.1"), ("cvc5", "0.0.1"), ("numpy", "0.0.1"), ("python", "2.7.18"),
                                       ("cvc5", None), ("numpy", None)])
def test_well_formed_but_foreign_tool_versions_are_rejected(key, value):
    """The certificate binds the tools it was made with: recheck compares them with the ones installed.
    Failed before the fix (the fuzzer confirmed 884 such edits: only hnfverify's own version was read)."""
    plan = make_plan()
    cert = certify(plan)
    cert["tool"][key] = value
    rejected(reseal(cert), plan)


def test_tool_entry_added_or_removed_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["tool"]["trusted-by"] = "1.0"
    rejected(reseal(cert), plan)
    cert = certify(plan)
    del cert["tool"]["z3"]
    rejected(reseal(cert), plan)


def test_empty_assumptions_are_rejected():
    """Failed before the fix (assumptions were never read)."""
    plan = make_plan()
    cert = certify(plan)
    cert["assumptions"]["measured"] = []
    rejected(reseal(cert), plan)


def test_assumption_edited_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["assumptions"]["measured"][0]["margin"] = "1000"
    rejected(reseal(cert), plan)


def test_kernel_semantics_edited_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    key = sorted(cert["assumptions"]["kernel"])[0]
    cert["assumptions"]["kernel"][key] = "float64"
    rejected(reseal(cert), plan)


@pytest.mark.parametrize("field,value", [("obligations", 1), ("by_family", {"lemma": 1}), ("positions_checked", 7),
                                         ("exact_fallbacks", -1), ("layer_bounds", ["0"])])
def test_summary_rewritten_is_rejected(field, value):
    """The self-hash is anyone's to recompute: the summary is re-derived. Failed before the fix
    (except layer_bounds, which the old recheck compared)."""
    plan = make_plan()
    cert = certify(plan)
    cert["summary"][field] = value
    rejected(reseal(cert), plan)


@pytest.mark.parametrize("field,value", [("name", "trust-me"), ("seed", 1), ("timeout_ms", -5),
                                         ("wall_timeout_s", "-1"), ("extra", 1)])
def test_malformed_solver_is_rejected(field, value):
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["solver"][field] = value
    rejected(reseal(cert), plan)


def test_unknown_certificate_key_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["signature"] = "trusted"
    rejected(reseal(cert), plan)


def test_malformed_created_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["created"] = "yesterday"
    rejected(reseal(cert), plan)


def test_plan_file_name_with_a_path_is_rejected():
    """Failed before the fix."""
    plan = make_plan()
    cert = certify(plan)
    cert["plan"]["file"] = "../../etc/plan.json"
    rejected(reseal(cert), plan)


def test_plan_sha256_mismatch_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    cert["plan"]["sha256"] = "0" * 64
    rejected(reseal(cert), plan)


def test_stale_self_hash_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    cert["summary"]["positions_checked"] += 1
    rejected(cert, plan)


def test_certificate_verdict_not_proved_is_rejected():
    plan = make_plan()
    cert = certify(plan)
    cert["verdict"] = "UNKNOWN"
    rejected(reseal(cert), plan)


def test_recheck_stays_standard_library_only():
    """recheck imports no hnfverify module and nothing outside the standard library."""
    import ast
    import sys

    package = Path(recheck.__file__).parent
    siblings = {p.stem for p in package.glob("*.py")}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        assert all(n.level == 1 and n.module in siblings for n in relative), path.name
        assert "hnfverify" not in mods
        assert mods <= set(sys.stdlib_module_names), (path.name, mods)


def test_genuine_certificate_with_a_bound_above_1e300_is_confirmed():
    """Bounds above 1e300 are null in witnesses and the summary (as check writes them)."""
    plan = null_claims(make_plan("avg-bits-product"))
    big = fmt_number(Fraction(10) ** 200)                     # amplification prod L_j ~ 10^(200 (L - 1))
    for layer in plan["layers"]:
        layer["lipschitz"] = {"measured": big, "margin": "1", "value": big}
    cert = certify(plan)
    assert cert["summary"]["end_to_end_bound"] is None
    code, msg = decide(cert, plan)
    assert code == 0, msg


def _audited(plan):
    opts = CheckOptions(smt_per_position=True)
    res = check_plan(plan, opts)
    assert res.verdict() == "PROVED"
    return json.loads(json.dumps(certificate.build(plan, sha(plan), "plan.json", res, opts)))


def test_per_position_audit_is_confirmed_only_when_complete():
    """`check --smt-per-position` certificates: the audit obligations are re-derived too; one removed
    (counts kept consistent) is REJECTED."""
    plan = make_plan("recent-0")
    cert = _audited(plan)
    audit = [o for o in cert["obligations"] if o["family"] == "precision-lower-bound-position"]
    assert audit
    assert decide(cert, plan)[0] == 0
    cert["obligations"].remove(audit[-1])
    assert "missing" in rejected(reseal(recount(cert)), plan)


def test_a_rotated_format_needs_a_power_of_two_head_dim():
    """int3_t12_h cannot run (no Sylvester Hadamard of order 12): check's validity, recheck and the oracle refuse
    the plan by name (docs/design.md §2.3c)."""
    from hnfverify.core.formats import format_table
    from hnfverify.core.recheck.base import Reject
    from hnfverify.core.recheck.validate import validate
    from hnfverify.core.validity import consistency_problems
    from tests import oracle

    assert not [n for n in format_table(12, 4) if n.endswith("_h")]
    p = make_plan("rotated")
    text = json.dumps(p).replace("_t16", "_t12")
    p = json.loads(text)
    p["shape"]["head_dim"] = 12
    p["formats"] = {n: by_name(n).to_json() for n in p["formats"]}
    probs = consistency_problems(p)
    assert any("power-of-two head_dim" in msg and "int3_t12_h" in path for path, msg in probs), probs
    with pytest.raises(Reject, match="power-of-two"):
        validate(p)
    ok, why, kind = oracle.validate(p)
    assert not ok and "power-of-two" in why and kind == "semantic", (why, kind)
    ok, why, _ = oracle.validate(make_plan("rotated"))
    assert ok, why
