"""Invalid plan files: a message naming the JSON path, exit code 2, never a traceback."""

import copy
import io
import json
from fractions import Fraction

import pytest

from hnfverify.cli import run
from hnfverify.core.plan import dumps, loads, plan_sha256
from hnfverify.planning import PlanRequest, plan_from_report


@pytest.fixture(scope="module")
def good_plan():
    from tests.strategies import fixed_report

    summary, arrays = fixed_report()
    return plan_from_report(summary, arrays, PlanRequest(eps=Fraction(10**6), sink=1, recent=4))


def _show(path):
    out, err = io.StringIO(), io.StringIO()
    code = run(["show", str(path)], out, err)
    return code, out.getvalue(), err.getvalue()


def test_good_plan_shows_and_round_trips(tmp_path, good_plan):
    p = tmp_path / "plan.json"
    p.write_bytes(dumps(good_plan))
    code, out, err = _show(p)
    assert code == 0, err
    assert plan_sha256(good_plan) in out and "compression vs FP16" in out
    assert dumps(loads(p.read_bytes())) == p.read_bytes()
    # whitespace does not change the hash
    assert plan_sha256(json.loads(json.dumps(good_plan))) == plan_sha256(good_plan)


def _mutations(plan):
    def m(fn):
        q = copy.deepcopy(plan)
        fn(q)
        return q

    yield "wrong type", m(lambda q: q.__setitem__("max_seq_len", "512")), "$.max_seq_len"
    yield "unknown format name", m(lambda q: q["layers"][0]["heads"][0]["K"]["rest"].__setitem__("format", "int5_t8")), \
        "$.layers[0].heads[0].K.rest.format"
    yield "format not in table", m(lambda q: q["layers"][0]["heads"][0]["V"]["rest"].__setitem__("format", "fp32")
                                   if "fp32" not in q["formats"] else q["formats"].pop("fp32")), "format"
    yield "negative length", m(lambda q: q["layers"][0]["heads"][0]["K"]["sink"].__setitem__("length", -1)), \
        "$.layers[0].heads[0].K.sink.length"
    yield "missing layer", m(lambda q: q["layers"].pop(0)), "$.layers"
    yield "unknown schema_version", m(lambda q: q.__setitem__("schema_version", 2)), "$.schema_version"
    yield "float instead of string", m(lambda q: q.__setitem__("eps", 0.5)), "$.eps"
    yield "lo above hi", m(lambda q: q["layers"][0]["heads"][0]["K"]["rest"]["inputs"].__setitem__("kappa", ["5", "1"])), \
        "$.layers[0].heads[0].K.rest.inputs.kappa"
    yield "tampered format definition", m(lambda q: next(iter(q["formats"].values())).__setitem__("u", "1/1000000")), \
        "$.formats."
    yield "extra field", m(lambda q: q.__setitem__("surprise", 1)), "$"
    blk = {"start": 2, "end": 6, "format": next(iter(plan["formats"])),
           "inputs": plan["layers"][0]["heads"][0]["K"]["rest"]["inputs"]}
    yield "overlapping blocks", m(lambda q: q["layers"][0]["heads"][0]["K"].__setitem__(
        "blocks", [blk, dict(blk, start=4, end=8)])), "$.layers[0].heads[0].K.blocks[1]"


@pytest.mark.parametrize("idx", range(11))
def test_invalid_plans_name_the_json_path(tmp_path, good_plan, idx):
    name, bad, path = list(_mutations(good_plan))[idx]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    code, out, err = _show(p)
    assert code == 2, (name, err)
    assert "Traceback" not in err and path in err, (name, err)


@pytest.mark.parametrize("text, needle", [
    ('{"eps": NaN}', "NaN"),
    ('{"eps": Infinity}', "Infinity"),
    ('{"a": 1, "a": 2}', "duplicate key"),
    ('{"layers": [', "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"eps": 1e999}', "$.eps"),
    ("", "not valid JSON"),
])
def test_malformed_json(tmp_path, text, needle):
    p = tmp_path / "bad.json"
    p.write_text(text)
    code, _, err = _show(p)
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_huge_junk_and_missing_file(tmp_path):
    p = tmp_path / "junk.json"
    with open(p, "wb") as fh:
        fh.seek(200 * 1024 * 1024 - 1)
        fh.write(b"x")
    code, _, err = _show(p)
    assert code == 2 and "refused" in err
    code, _, err = _show(tmp_path / "nope.json")
    assert code == 2 and "no such file" in err
    bin_ = tmp_path / "bin.json"
    bin_.write_bytes(b"\xff\xfe\x00")
    code, _, err = _show(bin_)
    assert code == 2 and "UTF-8" in err


def test_float_literals_anywhere_are_rejected_with_their_path(tmp_path, good_plan):
    bad = copy.deepcopy(good_plan)
    bad["assumptions"][0]["provenance"]["windows"] = 1.5          # a free-form field the schema allows
    p = tmp_path / "f.json"
    p.write_text(json.dumps(bad))
    code, _, err = _show(p)
    assert code == 2 and "$.assumptions[0].provenance.windows" in err and "float literal" in err
