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
