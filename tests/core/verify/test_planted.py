"""The planted-violation corpus (tests/data/planted, made by tests/data/make_planted.py): every
planted plan is REFUTED with the right location; the boundary controls are PROVED."""

import io
import json
from pathlib import Path

import pytest

from hnfverify.cli import run

CORPUS = Path(__file__).resolve().parents[2] / "data" / "planted"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())


@pytest.mark.parametrize("entry", MANIFEST, ids=[m["file"] for m in MANIFEST])
def test_planted_plan_is_refuted_at_its_location(entry, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = run(["check", str(CORPUS / entry["file"]), "--format", "json", "--cert-dir", str(tmp_path)], out, err)
    exp = entry["expect"]
    if exp["family"] is None:
        assert code == 0, out.getvalue() + err.getvalue()
        return
    assert code == 1, out.getvalue() + err.getvalue()
    refuted = [o for o in json.loads(out.getvalue())["obligations"] if o["verdict"] == "REFUTED"]
    mine = [o for o in refuted if o["family"] == exp["family"]]
    assert len(mine) == 1, refuted
    o = mine[0]
    if exp["family"] == "precision-lower-bound":
        loc = o["location"]
        assert (loc["layer"], loc["kv_head"], loc["kv"], loc["segment"]) == \
            (exp["layer"], exp["kv_head"], exp["kv"], exp["segment"])
        assert o["witness"]["first_violation_position"] == exp["position"]
    if exp["family"] == "attention-error-budget":
        assert (o["location"]["layer"], o["location"]["kv_head"]) == (exp["layer"], exp["kv_head"])
    assert not list(tmp_path.glob("*.cert.json"))


def test_corpus_is_reproducible():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_planted", CORPUS.parent / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from hnfverify.core.plan import dumps

    items = mod.planted()
    assert [f"{n}.json" for n, _, _ in items] == [m["file"] for m in MANIFEST]
    for name, plan, _ in items:
        assert dumps(plan) == (CORPUS / f"{name}.json").read_bytes(), name
