"""hnfverify check / recheck / replay: verdicts, planted violations, tampering, fail-closed, outputs."""

import copy
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from fractions import Fraction

import pytest

from hnfverify.cli import run
from hnfverify.core.numbers import fmt_number
from hnfverify.core.plan import dumps
from hnfverify.planning import PlanRequest, plan_from_report


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    return run(argv, out, err), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def plan_pair():
    from tests.strategies import fixed_report

    summary, arrays = fixed_report()
    base = plan_from_report(summary, arrays, PlanRequest(eps=Fraction(10**6), sink=1, recent=4))
    tgt = Fraction(base["claims"]["end_to_end_bound"]) * 2
    withtarget = plan_from_report(summary, arrays, PlanRequest(eps=Fraction(10**6), eps_target=tgt, sink=1, recent=4))
    return base, withtarget


def _write(tmp_path, plan, name="plan.json"):
    p = tmp_path / name
    p.write_bytes(dumps(plan))
    return p


def test_check_proves_writes_certificate_and_recheck_replay_confirm(tmp_path, plan_pair):
    for i, plan in enumerate(plan_pair):
        p = _write(tmp_path, plan, f"plan{i}.json")
        code, out, err = _run(["check", str(p), "--cert-dir", str(tmp_path / f"d{i}")])
        assert code == 0, out + err
        assert "PROVED" in out
        cert = next((tmp_path / f"d{i}").glob("*.cert.json"))
        (tmp_path / "certs").mkdir(exist_ok=True)
        (tmp_path / "certs" / cert.name).write_bytes(cert.read_bytes())
        code, out, _ = _run(["recheck", str(cert), "--plan", str(p)])
        assert code == 0 and "CONFIRMED" in out, out
    for solver in ("z3", "cvc5"):
        code, out, _ = _run(["replay", str(tmp_path / "certs"), "--solver", solver])
        assert code == 0 and " 0 sat, 0 unknown" in out, out


def test_two_runs_give_byte_identical_certificates(tmp_path, plan_pair, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    p = _write(tmp_path, plan_pair[1])
    blobs = []
    for d in ("a", "b"):
        assert _run(["check", str(p), "--cert-dir", str(tmp_path / d)])[0] == 0
        blobs.append(next((tmp_path / d).glob("*.cert.json")).read_bytes())
    assert blobs[0] == blobs[1]
    assert b'"created": "2023-11-14T22:13:20Z"' in blobs[0]


def _planted(plan, rhs_factor):
    """Add a one-position block to layer 0, head 0, K with kappa chosen so that c kappa D^2 u = eps * factor."""
    from hnfverify.core.formats import by_name

    q = copy.deepcopy(plan)
    rule = q["layers"][0]["heads"][0]["K"]
    inputs = copy.deepcopy(rule["rest"]["inputs"])
    name = rule["rest"]["format"]            # same format as its segment: only Theorem 5.7 is at stake
    f = by_name(name)
    d = Fraction(inputs["d_channel" if f.granularity == "channel" else "d_token"][1])
    kappa = Fraction(q["eps"]) * rhs_factor / (Fraction(q["c"]) * d * d * f.u)
    inputs["kappa"] = ["0", fmt_number(kappa)]
    pos = q["max_seq_len"] - 3
    rule["blocks"] = [{"start": pos, "end": pos + 1, "format": name, "inputs": inputs}]
    return q, pos


def test_planted_one_ulp_violation_is_refuted_and_named(tmp_path, plan_pair):
    plan = plan_pair[0]
    ok, _ = _planted(plan, Fraction(1))                       # exactly on the bound: holds
    code, out, _ = _run(["check", str(_write(tmp_path, ok, "ok.json")), "--cert-dir", str(tmp_path / "c")])
    assert code == 0, out
    bad, pos = _planted(plan, 1 + Fraction(1, 2**60))          # one part in 2^60 too coarse
    p = _write(tmp_path, bad, "bad.json")
    code, out, _ = _run(["check", str(p), "--cert-dir", str(tmp_path / "c2")])
    assert code == 1, out
    assert f"layer 0 head 0 K block0 positions {pos}-{pos}: first violation at position {pos}" in out
    assert not (tmp_path / "c2").exists()                      # no certificate for a refuted plan
    code, out, _ = _run(["check", str(p), "--format", "json"])
    refuted = [o for o in json.loads(out)["obligations"] if o["verdict"] == "REFUTED"]
    assert len(refuted) == 1 and refuted[0]["witness"]["first_violation_position"] == pos


def test_flipping_any_certificate_byte_makes_recheck_fail(tmp_path, plan_pair):
    import random

    p = _write(tmp_path, plan_pair[1])
    assert _run(["check", str(p), "--cert-dir", str(tmp_path / "c")])[0] == 0
    cert = next((tmp_path / "c").glob("*.cert.json"))
    blob = cert.read_bytes()
    rng = random.Random(0)
    positions = sorted(set(rng.sample(range(len(blob)), 150)) | {0, len(blob) - 1, len(blob) // 2})
    bad = tmp_path / "bad.cert.json"
    for i in positions:
        mutated = bytearray(blob)
        mutated[i] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(mutated))
        code, out, _ = _run(["recheck", str(bad), "--plan", str(p)])
        assert code != 0, f"byte {i} flipped and recheck still confirmed"
    # a different plan than the certified one
    other = copy.deepcopy(plan_pair[1])
    other["c"] = "5"
    code, out, _ = _run(["recheck", str(cert), "--plan", str(_write(tmp_path, other, "other.json"))])
    assert code == 1 and "sha256" in out


def test_solver_timeout_and_unknown_fail_closed(tmp_path, plan_pair):
    p = _write(tmp_path, plan_pair[1])
    code, out, _ = _run(["check", str(p), "--wall-timeout", "0.001", "--cert-dir", str(tmp_path / "c")])
    assert code == 3 and "UNDECIDED" in out and "wall-clock" in out
    assert not (tmp_path / "c").exists()


def test_recheck_missing_certificate_is_usage_error(tmp_path):
    code, _, err = _run(["recheck", str(tmp_path / "nope.cert.json")])
    assert code == 2 and "cannot read" in err


def test_sarif_and_junit_outputs(tmp_path, plan_pair):
    bad, pos = _planted(plan_pair[0], Fraction(2))
    p = _write(tmp_path, bad, "bad.json")
    sarif_path = tmp_path / "out.sarif"
    code, _, _ = _run(["check", str(p), "--format", "sarif", "--output", str(sarif_path)])
    assert code == 1
    doc = json.loads(sarif_path.read_text())
    assert doc["version"] == "2.1.0"
    res = doc["runs"][0]["results"]
    assert len(res) == 1 and res[0]["ruleId"] == "precision-lower-bound"
    assert res[0]["partialFingerprints"]["hnfverifyObligation/v1"]
    assert {r["id"] for r in doc["runs"][0]["tool"]["driver"]["rules"]} >= {"precision-lower-bound", "composition-law",
                                                                           "undecided"}
    code, out, _ = _run(["check", str(p), "--format", "junit"])
    root = ET.fromstring(out)
    suite = root.find("testsuite")
    assert suite.get("failures") == "1"
    names = [tc.get("name") for tc in suite.findall("testcase")]
    assert "layer 0" in names and len([n for n in names if n.startswith("layer ")]) == len(bad["layers"])


def test_check_imports_no_torch(tmp_path, plan_pair):
    p = _write(tmp_path, plan_pair[0])
    code = ("import sys, io\nfrom hnfverify.cli import run\n"
            f"rc = run(['check', {str(p)!r}, '--cert-dir', {str(tmp_path / 'c')!r}], io.StringIO(), io.StringIO())\n"
            "import hnfverify.core.recheck, hnfverify.core.verify.obligations, hnfverify.core.plan, hnfverify.planning\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print(rc, bad); sys.exit(1 if bad or rc else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_smt_per_position_audit(tmp_path, plan_pair):
    p = _write(tmp_path, plan_pair[0])
    code, out, _ = _run(["check", str(p), "--smt-per-position", "--format", "json", "--cert-dir", str(tmp_path / "c")])
    assert code == 0, out
    cert = json.loads(next((tmp_path / "c").glob("*.cert.json")).read_text())
    assert any(o["family"] == "precision-lower-bound-position" for o in cert["obligations"])


def test_certificate_matches_its_schema(tmp_path, plan_pair):
    import pathlib

    import jsonschema

    schema = json.loads((pathlib.Path(__file__).resolve().parents[3] / "specs" / "certificate.schema.json").read_text())
    p = _write(tmp_path, plan_pair[1])
    assert _run(["check", str(p), "--cert-dir", str(tmp_path / "c")])[0] == 0
    cert = json.loads(next((tmp_path / "c").glob("*.cert.json")).read_text())
    jsonschema.Draft202012Validator(schema).validate(cert)
    fams = {o["family"] for o in cert["obligations"]}
    assert {"lemma", "precision-lower-bound", "attention-error-budget", "composition-law"} <= fams


def test_recheck_refuses_a_one_gigabyte_certificate_without_reading_it(tmp_path, plan_pair):
    big = tmp_path / "big.cert.json"
    with open(big, "wb") as fh:
        fh.seek(1024 ** 3 - 1)
        fh.write(b"}")
    p = _write(tmp_path, plan_pair[0])
    code, out, _ = _run(["recheck", str(big), "--plan", str(p)])
    assert code == 1 and "larger than" in out


def test_fuzz_regressions_exit_cleanly_with_bounded_memory():
    """Inputs the fuzzer once broke the gate with (a d_token of 4e18 made exp(1.4e17) fill memory). No exponent
    above 128 is evaluated (docs/design.md §2.4): the plan is REFUTED in bounded memory, with a finite bound."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "data" / "regressions"
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from hnfverify.cli import main\nmain()\n")
    for f in sorted(root.glob("*.json")):
        r = subprocess.run([sys.executable, "-c", code, "check", str(f)], capture_output=True, text=True)
        assert r.returncode == 1 and "VIOLATED" in r.stdout and "Traceback" not in r.stderr, (f, r.stdout, r.stderr)
