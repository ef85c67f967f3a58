"""Bad input to check / show / replay gives one clear error and exit 2: never exit 4, a traceback, a
wrong acceptance, a half-written or a lost file. Each test says how it failed before the fix.

Torch-free: plans are tests/data/planted's, built in memory by tests/data/make_planted.py (so they
follow the current planner and schema): boundary-0 is PROVED, one-step-0 is REFUTED.
"""

import copy
import functools
import importlib.util
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hnfverify.core import plan as P
from hnfverify.cli import run
from hnfverify.errors import HnfError, InputError
from hnfverify.core.formats import by_name
from hnfverify.core.numbers import parse_number

GOOD = "boundary-0"         # a control, exactly on the bound: PROVED
BAD = "one-step-0"          # one format step too cheap: REFUTED


@functools.lru_cache(maxsize=1)
def _corpus() -> dict:
    spec = importlib.util.spec_from_file_location(
        "make_planted", Path(__file__).resolve().parents[1] / "data" / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {name: P.dumps(plan) for name, plan, _ in mod.planted()}


def _plan(name=GOOD) -> dict:
    return json.loads(_corpus()[name])


def _bytes(name=GOOD) -> bytes:
    return _corpus()[name]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = run(argv, out, err)
    return code, out.getvalue(), err.getvalue()


def _run_strict(argv):
    """Like a real terminal: streams that refuse what UTF-8 cannot encode (lone surrogates)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    code = run(argv, out, err)
    out.flush()
    err.flush()
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def _usage_error(code, err, *needles):
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err, err
    assert err.startswith("hnfverify: error: "), err
    for n in needles:
        assert n in err, (n, err)


def _write(tmp_path, plan, name="plan.json"):
    p = tmp_path / name
    p.write_bytes(P.dumps(plan))
    return p


@pytest.fixture
def good_plan(tmp_path):
    return _write(tmp_path, _plan(), "good.json")


@pytest.fixture
def cert(tmp_path, good_plan):
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(tmp_path / "certs")])
    assert code == 0, out + err
    return next((tmp_path / "certs").glob("*.cert.json"))


def test_the_unmutated_plans_check_as_expected(tmp_path):
    """Control for the mutations below: the good plan is PROVED, the bad one REFUTED."""
    for name, code in ((GOOD, 0), (BAD, 1)):
        p = tmp_path / f"{name}.json"
        p.write_bytes(_bytes(name))
        assert _run(["check", str(p), "--cert-dir", str(tmp_path / "c")])[0] == code


# --------------------------------------------------------------------------- 1. number grammar
@pytest.mark.parametrize("s", ["1\n", "0.5\n", "1/30\n", "1e3\n", "-2\n"])
def test_number_strings_with_a_trailing_newline_are_rejected(s):
    """Failed before the fix: parse_number("1\\n") returned 1 (`$` matches before a final newline)."""
    with pytest.raises(InputError, match="not a finite decimal or rational"):
        parse_number(s, "$.eps")
    parse_number(s[:-1], "$.eps")                  # the same text without the newline is a number


@pytest.mark.parametrize("name", ["fp16\n", "int4_t16\n", "fp8_e4m3_t64\n", "int8_c32\n",
                                  "int4_t\u0661\u0666", "int4_t016", "fp8_e5m2_t\u0663\u0662"])
def test_format_names_outside_the_grammar_are_rejected(name):
    """Failed before the fix: by_name accepted "fp16\\n" (`$`), and Unicode or zero-led digits via `\\d+`."""
    with pytest.raises(InputError, match="unknown format"):
        by_name(name)


def test_check_refuses_eps_with_a_trailing_newline(tmp_path):
    """Failed before the fix: exit 0, PROVED a plan with "eps": "50\\n"."""
    plan = _plan()
    plan["eps"] += "\n"
    code, out, err = _run(["check", str(_write(tmp_path, plan)), "--cert-dir", str(tmp_path / "c")])
    _usage_error(code, err, "$.eps")
    assert not (tmp_path / "c").exists()


def test_check_refuses_a_format_name_with_a_trailing_newline(tmp_path):
    """Failed before the fix: exit 0, PROVED a plan whose format key (and references) was "int2_t16\\n"."""
    text = P.dumps(_plan()).decode().replace('"int2_t16"', json.dumps("int2_t16\n"))
    assert "int2_t16\\n" in text
    p = tmp_path / "plan.json"
    p.write_text(text)
    code, out, err = _run(["check", str(p), "--cert-dir", str(tmp_path / "c")])
    _usage_error(code, err, "$.formats")


_NUM = re.compile(r"-?(0|[1-9][0-9]*)((\.[0-9]+)?([eE][-+]?[0-9]+)?|/[1-9][0-9]*)")
_FMT = re.compile(r"fp32|fp16|bf16|fp8_e(4m3|5m2)_t[1-9][0-9]*|(int(8|4|3|2)|lm(4|3|2))_(t|c)[1-9][0-9]*")
_SHA = re.compile(r"[0-9a-f]{64}")
# free text in the schema (plain strings: names, provenance, descriptions), where "64\n" is just text
_FREE = re.compile(r"^\$\.(tool|model|calibration|mode|analysis\.report)\b|\.provenance\b|\.(name|statement)$")


def _leaves(o, path="$"):
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _leaves(v, f"{path}[{i}]")
    elif isinstance(o, str):
        yield path, o


def _set(plan, path, value):
    parts = re.findall(r"\.([^.\[]+)|\[(\d+)\]", path[1:])
    node = plan
    keys = [k if k else int(i) for k, i in parts]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value


@pytest.mark.parametrize("source", [GOOD, BAD])
def test_every_number_format_and_sha_field_refuses_a_trailing_newline(source):
    """Failed before the fix: the loader accepted "\\n" after every one of ~100 kinds of fields
    (eps, c, claims, intervals, assumptions, format names, sha256s)."""
    base = _plan(source)
    P.loads(P.dumps(base))                                           # the plan itself is valid
    accepted, tried, kinds = [], 0, set()
    for path, s in _leaves(base):
        if _FREE.search(path) or not (_NUM.fullmatch(s) or _FMT.fullmatch(s) or _SHA.fullmatch(s)):
            continue
        kind = re.sub(r"\[\d+\]", "[]", path)       # one leaf of each kind of field (every layer's are alike)
        if kind in kinds:
            continue
        kinds.add(kind)
        plan = copy.deepcopy(base)
        _set(plan, path, s + "\n")
        tried += 1
        try:
            P.loads(P.dumps(plan))
            accepted.append(path)
        except InputError:
            pass
    assert tried > 100
    assert not accepted, accepted[:20]


# --------------------------------------------------------------------------- 2. lone surrogates
def _with_model_entry(entry: str) -> bytes:
    raw = json.dumps(_plan(), ensure_ascii=True)
    assert raw.count('"model": {') == 1
    return raw.replace('"model": {', '"model": {' + entry + ", ", 1).encode()


@pytest.mark.parametrize("entry, needle", [
    ('"note": "\\ud800"', "$.model.note"),
    ('"note": "ok \\udfff tail"', "$.model.note"),
    ('"\\udc00x": "v"', "$.model"),
])
def test_a_lone_surrogate_is_rejected_at_load_with_its_path(entry, needle):
    """Failed before the fix: loads accepted it and plan_sha256 raised UnicodeEncodeError (exit 4)."""
    with pytest.raises(InputError) as e:
        P.loads(_with_model_entry(entry))
    msg = str(e.value)
    assert needle in msg and "surrogate" in msg
    msg.encode("utf-8")                           # the message itself can be printed


def test_a_surrogate_pair_is_an_ordinary_character():
    """Guard for the test above: an escaped pair (an emoji) is valid UTF-8 and loads and hashes."""
    plan = P.loads(_with_model_entry('"note": "\\ud83d\\ude00"'))
    assert plan["model"]["note"] == "\U0001F600"
    P.plan_sha256(plan)


def test_check_with_a_lone_surrogate_in_provenance_is_exit_2(tmp_path):
    """Failed before the fix: exit 4, internal error: UnicodeEncodeError in canonical_json."""
    plan = _plan()
    plan["assumptions"][0]["provenance"]["note"] = "\ud800"
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan, ensure_ascii=True))
    code, out, err = _run_strict(["check", str(p), "--cert-dir", str(tmp_path / "c")])
    _usage_error(code, err, "$.assumptions[0].provenance.note", "surrogate")


# --------------------------------------------------------------------------- 3. long integer literals
@pytest.mark.parametrize("digits", [31, 5000])
def test_an_integer_literal_that_is_too_long_is_rejected(tmp_path, digits):
    """Failed before the fix: 5000 digits gave exit 4 (ValueError: Exceeds the limit (4300 digits));
    31 digits loaded."""
    raw = P.dumps(_plan()).decode().replace('"theorem_5_7_violations": 0', '"theorem_5_7_violations": '
                                            + "1" * digits, 1)
    assert "1" * digits in raw
    with pytest.raises(InputError, match="integer .*too long"):
        P.loads(raw.encode())
    p = tmp_path / "plan.json"
    p.write_text(raw)
    code, out, err = _run(["check", str(p), "--cert-dir", str(tmp_path / "c")])
    _usage_error(code, err, "too long", str(digits))


# --------------------------------------------------------------------------- 4. timeouts
_BAD_TIMEOUTS = [("--wall-timeout", v) for v in ("nan", "inf", "-inf", "1e308", "86401", "0", "-1", "abc")] + \
    [("--timeout-ms", v) for v in ("0", "-5", "86400001", "100000000000000000000", "1.5", "nan")]


@pytest.mark.parametrize("option, value", _BAD_TIMEOUTS)
def test_check_timeouts_out_of_range_are_exit_2(tmp_path, good_plan, option, value):
    """Failed before the fix: nan / inf / 1e308 gave exit 4 (float NaN to integer, OverflowError); 86401
    and 1e20 ms ran; 0 and -1 gave a message without the allowed range."""
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(tmp_path / "c"), f"{option}={value}"])
    _usage_error(code, err, option, "86400")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("option, value", _BAD_TIMEOUTS)
def test_replay_timeouts_out_of_range_are_exit_2(cert, option, value):
    """Failed before the fix: replay --wall-timeout nan/inf gave exit 4; --timeout-ms 0 replayed (exit 0)."""
    code, out, err = _run(["replay", str(cert), f"{option}={value}"])
    _usage_error(code, err, option, "86400")


def test_the_largest_allowed_timeouts_are_accepted(tmp_path, good_plan, cert):
    """Guard: the limits are not tighter than documented (86400 s, 86400000 ms)."""
    argv = ["--wall-timeout", "86400", "--timeout-ms", "86400000"]
    assert _run(["check", str(good_plan), "--cert-dir", str(tmp_path / "c2")] + argv)[0] == 0
    assert _run(["replay", str(cert)] + argv)[0] == 0


# --------------------------------------------------------------------------- 5. --cert-dir, --output
def _no_verification(monkeypatch):
    import hnfverify.core.verify.obligations as ob

    def boom(*a, **k):
        raise AssertionError("the verification ran although an output path was unusable")
    monkeypatch.setattr(ob, "check_plan", boom)


def _no_temp_files(*dirs):
    for d in dirs:
        left = [f.name for f in Path(d).iterdir() if f.name.endswith(".tmp")]
        assert not left, left


def test_cert_dir_that_is_a_regular_file(tmp_path, good_plan, monkeypatch):
    """Failed before the fix: exit 4 (FileExistsError) after the whole verification had run."""
    f = tmp_path / "certs"
    f.write_text("keep me")
    _no_verification(monkeypatch)
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(f)])
    _usage_error(code, err, "--cert-dir", "not a directory", str(f))
    assert f.read_text() == "keep me"


def test_cert_dir_below_a_regular_file(tmp_path, good_plan, monkeypatch):
    """Failed before the fix: exit 4 (NotADirectoryError) after the verification."""
    f = tmp_path / "file"
    f.write_text("x")
    _no_verification(monkeypatch)
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(f / "sub" / "certs")])
    _usage_error(code, err, "--cert-dir", str(f))


def test_output_that_is_a_directory(tmp_path, good_plan, monkeypatch):
    """Failed before the fix: exit 4 (IsADirectoryError on the rename) after the verification."""
    d = tmp_path / "reports"
    d.mkdir()
    _no_verification(monkeypatch)
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(tmp_path / "c"), "--output", str(d)])
    _usage_error(code, err, "--output", "is a directory")
    _no_temp_files(tmp_path, d)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("bad", ["below_file", "long_name", "fifo", "the_plan"])
def test_output_that_cannot_be_written(tmp_path, good_plan, monkeypatch, bad):
    """Failed before the fix: exit 4 (FileExistsError, OSError File name too long) after the
    verification; a FIFO was silently replaced by a regular file; --output = the plan overwrote it."""
    f = tmp_path / "file"
    f.write_text("x")
    if bad == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        target = tmp_path / "fifo"
        os.mkfifo(target)
    else:
        target = {"below_file": f / "out.sarif", "long_name": tmp_path / ("r" * 300 + ".sarif"),
                  "the_plan": good_plan}[bad]
    before = good_plan.read_bytes()
    _no_verification(monkeypatch)
    code, out, err = _run(["check", str(good_plan), "--format", "sarif", "--output", str(target),
                           "--cert-dir", str(tmp_path / "c")])
    _usage_error(code, err, "--output")
    assert good_plan.read_bytes() == before
    if bad == "fifo":
        assert not target.is_file() and target.exists()
    _no_temp_files(tmp_path)


def test_cert_dir_with_an_overlong_name(tmp_path, good_plan, monkeypatch):
    """Failed before the fix: exit 4 (OSError: File name too long) after the verification."""
    _no_verification(monkeypatch)
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(tmp_path / ("c" * 300))])
    _usage_error(code, err, "--cert-dir")


def test_write_failures_after_the_verification_are_exit_2(tmp_path, good_plan, monkeypatch):
    """Failed before the fix: an OSError while writing the certificate (e.g. disk full) was exit 4."""
    import hnfverify.core.verify.certificate as cert_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cert_mod, "write_bytes_atomic", full)
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(tmp_path / "c")])
    _usage_error(code, err, "--cert-dir", "No space left on device")


# --------------------------------------------------------------------------- 6. show, empty claims
def _empty_claims(plan):
    plan = copy.deepcopy(plan)
    plan["claims"]["layer_bounds"] = []
    plan["claims"]["attention_error_max"] = []
    return plan


@pytest.mark.parametrize("brief", [False, True])
def test_print_plan_with_empty_claims_lists(brief):
    """Failed before the fix: IndexError (table) / ValueError: max() arg is an empty sequence (footer)."""
    from hnfverify.cli import print_plan

    out = io.StringIO()
    print_plan(_empty_claims(_plan()), out, "0" * 64, brief)
    text = out.getvalue()
    assert "n/a" in text and "max attention-output error n/a" in text


def test_print_plan_with_short_claims_lists():
    """Failed before the fix: IndexError when attention_error_max has fewer entries than layers."""
    from hnfverify.cli import print_plan

    plan = _plan()
    plan["claims"]["attention_error_max"] = plan["claims"]["attention_error_max"][:1]
    out = io.StringIO()
    print_plan(plan, out, "0" * 64)
    rows = [ln for ln in out.getvalue().splitlines() if re.match(r"\s+\d+\s", ln)]
    assert len(rows) == len(plan["layers"]) and rows[-1].rstrip().endswith("n/a")


@pytest.mark.parametrize("flags", [[], ["--brief"]])
def test_show_with_empty_claims_lists_does_not_crash(tmp_path, flags):
    """Failed before the fix: exit 4 (IndexError / max() of an empty sequence). Either showing it
    (exit 0) or refusing the plan as invalid (exit 2) is right; an internal error is not."""
    code, out, err = _run(["show", str(_write(tmp_path, _empty_claims(_plan())))] + flags)
    assert code in (0, 2) and "internal error" not in err, err
    if code == 0 and not flags:
        assert "n/a" in out


# --------------------------------------------------------------------------- 7. control characters
_CTRL = "a\x01b\x1bc\x7fd\x0be"


@pytest.mark.parametrize("source", [GOOD, BAD])
def test_junit_with_control_characters_in_the_plan_path_is_well_formed(tmp_path, source):
    """Failed before the fix: \\x01 and \\x1b went raw into an attribute (not XML 1.0); ET could not parse."""
    p = tmp_path / f"{_CTRL}.json"
    p.write_bytes(_bytes(source))
    code, out, err = _run(["check", str(p), "--format", "junit", "--cert-dir", str(tmp_path / "c")])
    assert code in (0, 1), err
    root = ET.fromstring(out)
    cases = root.find("testsuite").findall("testcase")
    assert cases and all("\\x01" in c.get("classname") for c in cases)
    assert (code == 1) == bool(root.find("testsuite").findall("testcase/failure"))


@pytest.mark.parametrize("fmt", ["text", "sarif", "json"])
def test_other_renderers_with_control_characters_in_the_plan_path(tmp_path, fmt):
    """text failed before the fix: the path's ESC (terminal escape) and \\x01 were printed raw.
    SARIF and JSON were already valid JSON (escaped); this pins that."""
    p = tmp_path / f"{_CTRL}.json"
    p.write_bytes(_bytes(BAD))
    code, out, err = _run(["check", str(p), "--format", fmt, "--cert-dir", str(tmp_path / "c")])
    assert code == 1, err
    if fmt == "text":
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out), repr(out)
        assert "a\\x01b\\x1bc" in out
    else:
        doc = json.loads(out)
        if fmt == "json":
            assert doc["plan"] == str(p)
        else:
            uris = [loc["physicalLocation"]["artifactLocation"]["uri"] for r in doc["runs"][0]["results"]
                    for loc in r["locations"]]
            assert uris and not any(re.search(r"[\x00-\x20\x7f]", u) for u in uris), uris


def test_junit_escapes_control_characters_in_reasons():
    """Failed before the fix: an undecided obligation's reason with \\x1b made the JUnit XML invalid."""
    from hnfverify.core.verify import UNKNOWN, outputs
    from hnfverify.core.verify.obligations import CheckResult, Obligation

    o = Obligation("lemma/x", "lemma", {}, UNKNOWN, reason="solver said \x1b[31mno\x1b[0m \x00")
    xml = outputs.junit(CheckResult([o], 0, 0, {}, 0, []), "p.json")
    root = ET.fromstring(xml)
    assert "solver said" in root.find("testsuite/testcase/error").text


# --------------------------------------------------------------------------- 8. more of the same class
def test_plan_path_too_long_is_exit_2(tmp_path):
    """Failed before the fix: exit 4 (OSError: File name too long) on check and show."""
    p = str(tmp_path / ("p" * 5000))
    for cmd in ("check", "show"):
        code, out, err = _run([cmd, p])
        _usage_error(code, err, "plan")
        assert len(err) < 1000


def test_plan_path_that_is_not_utf8(tmp_path):
    """Failed before the fix: exit 4 (UnicodeEncodeError writing the certificate / the report)."""
    p = os.fsdecode(os.fsencode(str(tmp_path)) + b"/plan-\xff.json")
    Path(p).write_bytes(_bytes(GOOD))
    for fmt in ("text", "junit"):
        code, out, err = _run_strict(["check", p, "--format", fmt, "--cert-dir", str(tmp_path / "c")])
        _usage_error(code, err, "UTF-8")


def test_error_messages_with_undecodable_file_names_are_printed(tmp_path):
    """Failed before the fix: the error message (a file name with a surrogate escape) could not be
    written to a UTF-8 stderr: UnicodeEncodeError escaped run() as a traceback."""
    d = tmp_path / "certs"
    d.mkdir()
    (Path(os.fsdecode(os.fsencode(str(d)) + b"/\xff.cert.json"))).write_text("garbage")
    code, out, err = _run_strict(["replay", str(d)])
    _usage_error(code, err, "not a readable certificate")


def test_replay_dump_that_is_a_regular_file(tmp_path, cert):
    """Failed before the fix: exit 4 (FileExistsError)."""
    f = tmp_path / "dumpfile"
    f.write_text("x")
    code, out, err = _run(["replay", str(cert), "--dump", str(f)])
    _usage_error(code, err, "--dump")
    assert f.read_text() == "x"


@pytest.mark.parametrize("mutate", ["obligations_dict", "smt2_int", "id_list", "surrogate", "deep", "no_queries"])
def test_replay_of_malformed_certificates(tmp_path, cert, mutate):
    """Failed before the fix: a non-list obligations / no queries replayed as exit 0; an int smt2 or a
    lone surrogate gave exit 3 (solver 'unknown'); deep nesting gave exit 4 (RecursionError)."""
    c = json.loads(cert.read_text())
    if mutate == "obligations_dict":
        c["obligations"] = {"a": 1}
    elif mutate == "smt2_int":
        c["obligations"][0]["smt2"] = 5
    elif mutate == "id_list":
        c["obligations"][0]["id"] = [1]
    elif mutate == "no_queries":
        for o in c["obligations"]:
            o.pop("smt2", None)
    p = tmp_path / "m.cert.json"
    if mutate == "deep":
        p.write_text("[" * 100000 + "]" * 100000)
    elif mutate == "surrogate":
        p.write_text(json.dumps(c).replace('"smt2": "', '"smt2": "\\ud800', 1))
    else:
        p.write_text(json.dumps(c))
    code, out, err = _run(["replay", str(p)])
    _usage_error(code, err, "m.cert.json")


def test_every_usage_error_is_an_hnf_error():
    """Guard: the exceptions used above are the named ones of hnfverify.errors."""
    assert issubclass(InputError, HnfError) and InputError.exit_code == 2


def test_cert_dir_whose_certificate_name_is_taken_by_a_directory(tmp_path, good_plan, monkeypatch):
    """Failed before the fix: exit 4 (IsADirectoryError on the rename) after the verification."""
    sha = P.plan_sha256(P.load_plan(good_plan))
    d = tmp_path / "certs"
    (d / f"{sha[:16]}.cert.json").mkdir(parents=True)
    _no_verification(monkeypatch)
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(d)])
    _usage_error(code, err, "--cert-dir", f"{sha[:16]}.cert.json")


def test_empty_paths_are_refused(tmp_path, good_plan, cert):
    """Failed before the fix: --output '' and --dump '' were silently ignored (exit 0), and an empty
    plan path was reported as "plan '.' is not a regular file"."""
    code, out, err = _run(["check", str(good_plan), "--cert-dir", str(tmp_path / "c"), "--output", ""])
    _usage_error(code, err, "--output", "empty")
    code, out, err = _run(["replay", str(cert), "--dump", ""])
    _usage_error(code, err, "--dump", "empty")
    for cmd in ("check", "show"):
        code, out, err = _run([cmd, ""])
        _usage_error(code, err, "plan path is empty")
