"""CLI behaviour in-process: exit codes, one-line errors, no partial output files."""

import io
import json

import pytest

from hnfverify.cli import run


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = run(argv, out, err)
    return code, out.getvalue(), err.getvalue()


def _no_traceback(err):
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(("hnfverify: error:", "usage:", "hnfverify analyze: error:")) \
        or "error:" in err, err


@pytest.fixture
def textfile(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return p


def test_analyze_tiny_model_writes_report_and_prints_summary(tmp_path, textfile):
    out = tmp_path / "rep.json"
    code, stdout, err = _run(["analyze", "--model", "tiny-llama", "--calib", str(textfile), "--max-tokens", "128",
                              "--window", "64", "--out", str(out), "--quiet", "--threads", "1"])
    assert code == 0, err
    assert out.exists() and (tmp_path / "rep.safetensors").exists()
    assert "4 layers x 2 KV heads" in stdout and "max kappa" in stdout
    summary = json.loads(out.read_text())
    assert summary["calibration"]["n_windows"] == 2 and summary["shape"]["positions"] == 64
    code, stdout, _ = _run(["inspect", str(out), "--layer", "1", "--head", "1", "--position", "10", "--json"])
    row = json.loads(stdout)
    assert code == 0 and row["layer"] == 1 and row["kappa_lo"] <= row["kappa_hi"]


def test_analyze_json_flag(tmp_path, textfile):
    code, stdout, _ = _run(["analyze", "--model", "tiny-qwen2", "--calib", str(textfile), "--max-tokens", "32",
                            "--out", str(tmp_path / "r.json"), "--json", "--quiet", "--lipschitz-iters", "0"])
    assert code == 0
    s = json.loads(stdout)
    assert s["kind"] == "hnfverify-analysis" and len(s["layers"]) == 4
    assert s["layers"][0]["lipschitz_measured"] is None


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no-such-model"], "unknown model"),
    (["--calib", "/nonexistent/file.txt"], "no such file"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "-5"], "--max-tokens"),
    (["--max-tokens", "lots"], "--max-tokens"),
    (["--curvature", "magic"], "--curvature"),
    (["--window", "1"], "--window"),
    (["--model", "/nonexistent/model"], "no such file or directory"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, textfile, argv, needle):
    out = tmp_path / "r.json"
    base = ["analyze", "--model", "tiny-llama", "--calib", str(textfile), "--out", str(out), "--quiet"]
    code, _, err = _run(base + argv)
    assert code == 2, err
    assert needle in err
    _no_traceback(err)
    assert not out.exists() and not (tmp_path / "r.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["calib.txt"]


def test_empty_text_and_model_without_attention(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "r.json"
    code, _, err = _run(["analyze", "--model", "tiny-llama", "--calib", str(empty), "--out", str(out), "--quiet"])
    assert code == 2 and "empty" in err and not out.exists()
    _no_traceback(err)

    from transformers import AutoModelForCausalLM, MambaConfig

    mdir = tmp_path / "mamba"
    AutoModelForCausalLM.from_config(MambaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                                 state_size=4)).save_pretrained(mdir)
    text = tmp_path / "t.txt"
    text.write_text("some text " * 20)
    code, _, err = _run(["analyze", "--model", str(mdir), "--calib", str(text), "--max-tokens", "16",
                         "--out", str(out), "--quiet"])
    assert code == 2 and "no attention layers" in err, err
    _no_traceback(err)
    assert not out.exists()


def test_out_is_a_directory_and_bad_report(tmp_path, textfile):
    code, _, err = _run(["analyze", "--model", "tiny-llama", "--calib", str(textfile), "--out", str(tmp_path)])
    assert code == 2 and "directory" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = _run(["inspect", str(bad)])
    assert code == 2 and "not valid JSON" in err
    bad.write_text(json.dumps({"kind": "hnfverify-analysis", "schema_version": 99}))
    code, _, err = _run(["inspect", str(bad)])
    assert code == 2 and "schema_version" in err


def test_no_command_is_usage_error():
    code, _, err = _run([])
    assert code == 2


def test_module_entry_point_runs_without_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hnfverify", "analyze", "--model", "nope", "--out",
                        str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_plan_and_show_from_tiny_report(tmp_path, textfile):
    rep = tmp_path / "rep.json"
    code, _, err = _run(["analyze", "--model", "tiny-llama", "--calib", str(textfile), "--max-tokens", "96",
                         "--window", "48", "--out", str(rep), "--quiet", "--lipschitz-iters", "2"])
    assert code == 0, err
    plan = tmp_path / "plan.json"
    code, out, err = _run(["plan", str(rep), "--eps", "1e3", "--sink", "4", "--recent", "16", "--out", str(plan)])
    assert code == 0, err
    assert "compression vs FP16" in out and plan.exists()
    code, out2, _ = _run(["show", str(plan)])
    assert code == 0 and "sha256" in out2
    code, out3, _ = _run(["plan", str(rep), "--avg-bits", "12", "--sink", "4", "--recent", "16", "--out",
                          str(tmp_path / "p2.json"), "--json"])
    assert code == 0 and json.loads(out3)["claims"]["avg_bits"]
    code, _, err = _run(["plan", str(rep), "--uniform", "int4_t16", "--sink", "4", "--recent", "16",
                         "--out", str(tmp_path / "p3.json")])
    assert code == 0, err


@pytest.mark.parametrize("argv, needle", [
    ([], "give --eps"),
    (["--eps", "abc"], "--eps must be a finite number"),
    (["--eps", "nan"], "--eps must be a finite number"),
    (["--eps", "-1"], "--eps must be > 0"),
    (["--eps", "1", "--recent", "7"], "--recent must be one of"),
    (["--uniform", "int5_t16"], "unknown format"),
    (["--eps", "1e-12"], "Theorem 5.7 cannot hold"),
])
def test_plan_bad_requests(tmp_path, textfile, argv, needle):
    rep = tmp_path / "rep.json"
    code, _, err = _run(["analyze", "--model", "tiny-llama", "--calib", str(textfile), "--max-tokens", "48",
                         "--out", str(rep), "--quiet", "--lipschitz-iters", "1"])
    assert code == 0, err
    out = tmp_path / "plan.json"
    code, _, err = _run(["plan", str(rep), "--out", str(out)] + argv)
    assert code == 2 and needle in err, err
    _no_traceback(err)
    assert not out.exists()


def test_analyze_with_plan_writes_both(tmp_path, textfile):
    out = tmp_path / "plan.json"
    code, stdout, err = _run(["analyze", "--model", "tiny-qwen2", "--calib", str(textfile), "--max-tokens", "64",
                              "--quiet", "--plan", "--eps", "1e4", "--recent", "16", "--out", str(out)])
    assert code == 0, err
    assert out.exists() and (tmp_path / "plan.report.json").exists() and (tmp_path / "plan.report.safetensors").exists()
    assert "max kappa" in stdout and "compression vs FP16" in stdout


def test_closed_stdout_is_a_quiet_exit_not_an_internal_error(tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "hnfverify", "splits"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()                                   # the reader is gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait() == 141, err
    assert "internal error" not in err and "Traceback" not in err and "Exception ignored" not in err, err
