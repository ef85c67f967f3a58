"""The trusted core as a package: its schema ships as package data (identical to specs/), its
vocabularies are defined once, and it checks and rechecks a plan without torch or transformers."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_packaged_schema_is_byte_identical_to_specs():
    from hnfverify.core import plan

    assert plan.SCHEMA_PATH.parent == Path(plan.__file__).resolve().parent      # inside the package
    assert plan.SCHEMA_PATH.read_bytes() == (ROOT / "specs" / "plan.schema.json").read_bytes()
    schema = json.loads(plan.SCHEMA_PATH.read_text())
    assert schema["properties"]["schema_version"] == {"const": plan.SCHEMA_VERSION}


def test_schema_is_declared_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\n"hnfverify.core" = ["plan.schema.json"]' in text


def test_verdicts_are_ordered_and_carry_their_exit_codes():
    from hnfverify.core.verify import PROVED, REFUTED, UNKNOWN
    from hnfverify.core.vocabulary import Verdict
    from hnfverify.errors import EXIT_OK, EXIT_UNDECIDED, EXIT_VIOLATED

    assert PROVED < UNKNOWN < REFUTED and max([UNKNOWN, REFUTED, PROVED]) is REFUTED
    assert [v.exit_code for v in (PROVED, UNKNOWN, REFUTED)] == [EXIT_OK, EXIT_UNDECIDED, EXIT_VIOLATED]
    assert Verdict("UNKNOWN") is UNKNOWN
    # a verdict reads as its string everywhere it is written
    assert PROVED == "PROVED" and f"{REFUTED}" == "REFUTED" and str(UNKNOWN) == "UNKNOWN"
    assert json.dumps({"verdict": PROVED}) == '{"verdict": "PROVED"}'


def test_cli_choices_come_from_the_vocabularies():
    from hnfverify.cli import build_parser
    from hnfverify.core.vocabulary import Corpus, Curvature, Objective, Solver

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    choices = {(cmd, a.dest): tuple(a.choices) for cmd, p in subs.items() for a in p._actions if a.choices}
    assert choices[("check", "solver")] == choices[("replay", "solver")] == Solver.values()
    assert choices[("plan", "objective")] == Objective.values()
    assert choices[("plan", "plan_curvature")] == choices[("analyze", "plan_curvature")] == Curvature.values()
    # --text takes a corpus of the vocabulary or a file: the default is the vocabulary's, no fixed choices
    texts = {cmd: a for cmd, p in subs.items() for a in p._actions if a.dest == "text"}
    assert texts["report"].default in Corpus.values() and not texts["report"].choices and not texts["eval"].choices


BLOCKER = r"""
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Blocker())
"""

CHECK_AND_RECHECK = r"""
import json, pathlib, sys
import hnfverify.core
from hnfverify.core import recheck
from hnfverify.core.plan import load_plan, plan_sha256
from hnfverify.core.verify import PROVED, certificate
from hnfverify.core.verify.obligations import CheckOptions, check_plan

plan_path, cert_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
plan = load_plan(str(plan_path))
options = CheckOptions()
result = check_plan(plan, options)
assert result.verdict() == PROVED, result.verdict()
cert = certificate.build(plan, plan_sha256(plan), plan_path.name, result, options)
cert_path = certificate.write(cert, str(cert_dir))
code, message = recheck.decide(pathlib.Path(cert_path).read_bytes(), plan_path.read_bytes())
assert code == 0, message
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"verdict": result.verdict(), "recheck": message.split(":")[0], "loaded": loaded}))
"""


def test_core_checks_and_rechecks_without_torch_or_transformers(tmp_path):
    """Import hnfverify.core, check a plan (z3) and recheck its certificate in one process in which
    torch and transformers cannot be imported at all."""
    plan = ROOT / "tests" / "data" / "planted" / "boundary-0.json"
    target = tmp_path / plan.name
    target.write_bytes(plan.read_bytes())
    r = subprocess.run([sys.executable, "-c", BLOCKER + CHECK_AND_RECHECK, str(target), str(tmp_path / "certs")],
                       capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == {"verdict": "PROVED", "recheck": "CONFIRMED", "loaded": []}


def test_the_blocker_blocks():
    """The blocker of the test above really keeps torch out (else that test could not fail)."""
    r = subprocess.run([sys.executable, "-c", BLOCKER + "import torch\n"], capture_output=True, text=True)
    assert r.returncode != 0 and "blocked: torch" in r.stderr


def test_core_imports_only_core_errors_and_io():
    """Layering: no module of hnfverify/core/ imports anything of hnfverify outside core/, errors, io."""
    import ast

    core = ROOT / "hnfverify" / "core"
    for path in core.rglob("*.py"):
        package = path.relative_to(ROOT).with_suffix("").parts[:-1]       # ('hnfverify', 'core', ...)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    target = ".".join(base + ((node.module,) if node.module else ()))
                else:
                    target = node.module or ""
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("hnfverify"):
                    assert name.startswith(("hnfverify.core", "hnfverify.errors", "hnfverify.io")), (path, name)
