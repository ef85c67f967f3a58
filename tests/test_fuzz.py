"""A short slice of tests/fuzz_gate.py inside the suite (CI also runs a two-minute slice; `make fuzz` 100k)."""

import subprocess
import sys
from pathlib import Path


def test_fuzz_slice_finds_no_traceback_no_false_proved(tmp_path):
    script = Path(__file__).resolve().parent / "fuzz_gate.py"
    r = subprocess.run([sys.executable, str(script), "--cases", "400", "--cli-every", "100", "--seed", "11",
                        "--save", str(tmp_path / "fail")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tracebacks 0, false_proved 0, mutated_certificates_accepted 0" in r.stdout
    assert "cases 400" in r.stdout
