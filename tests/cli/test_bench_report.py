"""benchmarks/write_report.py states losses and wins at equal bytes from the numbers, both ways."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("write_report", Path(__file__).parents[2] / "benchmarks" / "write_report.py")
wr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wr)


def _row(name, group, bits, kld_prose, kld_code):
    ev = {c: {"bits_per_element_decode_mean": bits, "bits_per_element": bits, "kld": k, "ppl": 10.0, "ppl_ref": 9.0,
              "top1": 0.9, "bound_violations": 0, "attention_outputs_checked": 10}
          for c, k in (("prose", kld_prose), ("code", kld_code))}
    return {"method": name, "group": group, "eval": ev, "plan": "p.json", "check": "PROVED",
            "attention_error_bound_max": 1.0}


def test_verdicts_name_the_peer_that_wins_with_fewer_bytes():
    rows = [_row("ours-4", "hnfverify", 4.0, 0.05, 0.06), _row("ours-6", "hnfverify", 6.0, 0.02, 0.02),
            _row("peer-5", "peer", 5.0, 0.01, 0.01), _row("peer-4.5", "peer", 4.5, 0.2, 0.2),
            _row("peer-mixed", "peer", 3.9, 0.04, 0.07)]
    lines = {ln.split("**")[1]: ln for ln in wr.verdicts(rows)}
    assert "**loses** to peer-5" in lines["ours-6"]              # fewer bytes, lower KLD on both texts
    assert "loses" not in lines["ours-4"]                          # peer-mixed is better on one text only
    assert "beats peer-4.5" in lines["ours-4"] and "beats" not in lines["ours-6"]


def test_main_table_has_one_line_per_method_sorted_peers_first():
    rows = [_row("ours", "hnfverify", 4.0, 0.05, 0.06), _row("peer", "peer", 5.0, 0.01, 0.01)]
    table = wr.main_table(rows, full_ms=50.0)
    assert len(table) == 2 + 2 and table[2].startswith("| peer |") and table[3].startswith("| ours |")
    assert "| 4.000 |" in table[3] and "0 of 20" in table[3]


def _row_ppl(name, group, bits, kld, dppl_pct):
    r = _row(name, group, bits, kld, kld)
    for c in ("prose", "code"):
        r["eval"][c]["ppl"] = 9.0 * (1 + dppl_pct / 100)
    return r


def test_goals_count_bits_while_decoding_and_both_conditions():
    rows = [_row_ppl("hnf-avg4.5", "hnfverify", 4.62, 0.005, 0.3),      # meets the numbers, over the budget
            _row_ppl("fixed", "hnfverify", 4.40, 0.02, 0.4),            # within, KLD too high
            _row_ppl("hnf-avg3", "hnfverify", 2.99, 0.05, 4.0)]          # within 3 bits, ΔPPL <= 5%
    lines = wr.goals(rows)
    g45 = [ln for ln in lines if ln.startswith("| 4.5 |")]
    assert "`fixed`" in g45[0] and "| yes |" in g45[0] and g45[0].endswith("**no** |")
    assert "`hnf-avg4.5`" in g45[1] and "| no |" in g45[1] and g45[1].endswith("**no** |")
    g3 = [ln for ln in lines if ln.startswith("| 3.0 |")]
    assert len(g3) == 1 and "`hnf-avg3`" in g3[0] and g3[0].endswith("**yes** |")


def test_pareto_goal_compares_with_every_peer_within_the_budget():
    rows = [_row("ours-4.4", "hnfverify", 4.4, 0.01, 0.01), _row("kivi", "peer", 6.9, 0.004, 0.006),
            _row("int4", "peer", 4.5, 0.09, 0.09), _row("mixed", "peer", 4.0, 0.005, 0.05)]
    lines = {ln.split(" |")[0]: ln for ln in wr.goals(rows) if ln.startswith("| ") and ln[2].isdigit()}
    assert "none" in lines["| 3"] or "(none)" in lines["| 3"]
    assert "mixed (4.00 bits" in lines["| 4.5"] and lines["| 4.5"].endswith("**no** |")   # better on one text
    assert "kivi (6.90 bits" in lines["| 7"] and "int4" not in lines["| 7"]
    assert lines["| 8"].endswith("**no** |")
