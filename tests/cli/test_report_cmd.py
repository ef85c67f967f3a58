"""`hnfverify report`: the heatmap grid is the plan's formats; PNGs written; bad input -> exit 2."""

import json
from fractions import Fraction

import pytest

pytest.importorskip("matplotlib")

from hnfverify.core.plan import save_plan  # noqa: E402
from hnfverify.planning import PlanRequest, plan_from_report  # noqa: E402
from hnfverify.plots import plan_bits_grid  # noqa: E402
from tests.strategies import fixed_report  # noqa: E402


def _kivi_plan():
    summary, arrays = fixed_report()
    d, cg = summary["shape"]["head_dim"], summary["analysis"]["channel_group"]
    return plan_from_report(summary, arrays, PlanRequest(uniform=f"fp16,K.rest=int4_c{cg},V.rest=int8_t{d}",
                                                         sink=0, recent=4)), d, cg


def test_heatmap_grid_follows_the_plan_segments():
    plan, d, cg = _kivi_plan()
    t = plan["max_seq_len"]
    k, v, edges = plan_bits_grid(plan, buckets=t)          # one bucket per position
    assert k.shape == (len(plan["layers"]), t)
    # positions [0, t-4) rest, the last 4 the FP16 recent window
    assert (k[:, t - 4:] == 16).all() and (v[:, t - 4:] == 16).all()
    assert (k[:, :t - 4] == float(Fraction(4) + Fraction(32, cg))).all()
    assert (v[:, :t - 4] == float(Fraction(8) + Fraction(32, d))).all()


def test_report_writes_pngs_and_rejects_bad_input(tmp_path, run_cli, no_traceback):
    plan, _, _ = _kivi_plan()
    p = tmp_path / "plan.json"
    save_plan(plan, p)
    rows = [{"method": m, "group": g, "eval": {"prose": {"bits_per_element": b, "kld": k}}}
            for m, g, b, k in (("a", "peer", 4.5, 0.1), ("b", "hnfverify", 4.0, 0.05), ("c", "ablation", 16, 0.0))]
    bench = tmp_path / "quality.json"
    bench.write_text(json.dumps({"rows": rows}))
    code, out, err = run_cli(["report", str(p), "--out", str(tmp_path / "r"), "--eval-windows", "0",
                           "--bench", str(bench)])
    assert code == 0, err
    for name in ("heatmap.png", "pareto-prose.png"):
        f = tmp_path / "r" / name
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {f}" in out
    assert not list((tmp_path / "r").glob("*.tmp*"))
    bench.write_text(json.dumps({"rows": [{"method": "x"}]}))
    for argv, msg in ((["--bench", str(bench)], "not a benchmarks/quality.py result"),
                      (["--bench", str(tmp_path / "missing.json")], "--bench"),
                      (["--eval-windows", "-1"], "--eval-windows"),
                      (["--text", str(tmp_path / "no-such-text.txt")], "--text must be prose or code")):
        code, _, err = run_cli(["report", str(p), "--out", str(tmp_path / "r2")] + argv)
        assert code == 2 and msg in err, err
        no_traceback(err)
