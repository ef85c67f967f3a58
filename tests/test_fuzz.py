"""A short slice of tests/fuzz_gate.py inside the suite (CI also runs a two-minute slice; `make fuzz` 100k)."""

import re
import subprocess
import sys
from pathlib import Path


def test_fuzz_slice_finds_no_traceback_no_false_proved(tmp_path):
    script = Path(__file__).resolve().parent / "fuzz_gate.py"
    r = subprocess.run([sys.executable, str(script), "--cases", "400", "--cli-every", "100", "--cert-every", "20",
                        "--seed", "11", "--save", str(tmp_path / "fail")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "fuzz: 0 tracebacks, 0 false PROVED, 0 wrong or edited certificates confirmed" in r.stdout
    assert "traceback 0, exit-4 0, false-proved 0, recheck-rejects-genuine 0, cert-confirmed-wrong 0, " \
           "cert-confirmed-edited 0, oracle-crash 0" in r.stdout
    assert "fuzz: cases 400," in r.stdout
    m = re.search(r"(\d+) of (\d+) plan cases decided \(PROVED or REFUTED\): ([\d.]+)%; (\d+) within one step",
                  r.stdout)
    assert m, r.stdout[-3000:]
    assert float(m.group(3)) >= 30.0 and int(m.group(4)) > 0
    for gen in ("kv-lengths", "windows", "channel-groups", "domain", "inconsistent", "threshold", "cert-edit"):
        assert f"  {gen} " in r.stdout, gen


def test_oracle_is_standard_library_only():
    """The oracle imports nothing from hnfverify (or anything outside the standard library)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parent / "oracle.py").read_text())
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imports <= {"__future__", "json", "math", "re", "fractions"}, imports
