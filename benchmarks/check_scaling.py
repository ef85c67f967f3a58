"""How `hnfverify check` scales: synthetic rule plans shaped like SmolLM2 (30 layers x 3 KV heads,
2K positions) and a 7B-class model (32 x 8) at 4K and 32K positions. Every state is decided once
(docs/design.md §5), so the cost does not grow with the positions. Reports wall time, solver time,
recheck time and peak memory. One process at a time; torch is never imported.

    .venv/bin/python benchmarks/check_scaling.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from fractions import Fraction


def synthetic_plan(layers: int, heads: int, qheads: int, d: int, t: int, seed: int = 0) -> dict:
    from hnfverify.core.formats import by_name
    from hnfverify.core.numbers import dec_up

    rng = random.Random(seed)
    fk = {"sink": "fp16", "recent": f"int8_t{d}", "rest": "int4_c32"}
    fv = {"sink": "fp16", "recent": f"int8_t{d}", "rest": f"int4_t{d}"}

    def inputs(kv):
        def iv(lo, hi):
            x = rng.uniform(lo, hi)
            return [dec_up(x * 0.999), dec_up(x)]
        return {"kappa": iv(0, 0.05) if kv == "K" else ["0", "0"], "d_token": iv(20, 60), "d_channel": iv(5, 15),
                "amax": iv(2, 8), "alpha": iv(0, 1), "qnorm": iv(5, 25), "vo": iv(1, 30),
                "mass_alpha": iv(0, 1), "mass_avo": iv(0, 5)}

    lay = []
    for li in range(layers):
        hs = []
        for h in range(heads):
            e = {"kv_head": h, "o_proj_norm": dec_up(rng.uniform(5, 15)), "q_max": "25"}
            for kv, f in (("K", fk), ("V", fv)):
                e[kv] = {"sink": {"length": 4, "format": f["sink"], "inputs": inputs(kv)},
                         "recent": {"length": 64, "format": f["recent"], "inputs": inputs(kv)},
                         "rest": {"format": f["rest"], "inputs": inputs(kv)}, "blocks": []}
            hs.append(e)
        lay.append({"layer": li, "tau": dec_up(d ** -0.5), "heads": hs,
                    "lipschitz": {"measured": "1.05", "margin": "1", "value": "1.05"},
                    "mlp_lipschitz": {"measured": "1.02", "margin": "1", "value": "1.02"}, "suffix": None})
    names = sorted(set(fk.values()) | set(fv.values()))
    return {
        "schema_version": 1, "kind": "hnfverify-plan", "tool": {"name": "hnfverify", "version": "bench"},
        "model": {"name": f"synthetic-{layers}x{heads}", "config_sha256": "0" * 64},
        "calibration": {"token_ids_sha256": "0" * 64},
        "analysis": {"report": "synthetic", "arrays_sha256": "0" * 64, "curvature": "exact", "channel_group": 32},
        "shape": {"layers": layers, "kv_heads": heads, "query_heads": qheads, "head_dim": d},
        "max_seq_len": t, "eps": "1000", "eps_source": "user", "eps_target": "1E+300", "c": "4", "max_kl": None,
        "composition": {"form": "product", "remainder": None, "logit_gain": None},
        "mode": {"kind": "avg_bits", "value": "6", "budget_split": "synthetic"},
        "rule": {"sink": 4, "recent": 64},
        "formats": {n: by_name(n).to_json() for n in names},
        "layers": lay, "assumptions": [],
        "claims": {"avg_bits": "6", "compression_vs_fp16": "2", "cache_bits_at_max_seq_len": "0",
                   "layer_bounds": [None] * layers, "end_to_end_bound": None, "theorem_5_7_violations": 0,
                   "attention_error_max": [None] * layers, "logit_bound": None, "kl_bound": None},
    }


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_plan(name, layers, heads, qheads, d, t, tmpdir):
    from hnfverify.core.plan import dumps, loads, plan_sha256
    from hnfverify.core.recheck import recheck
    from hnfverify.core.verify import certificate
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    plan = synthetic_plan(layers, heads, qheads, d, t)
    blob = dumps(plan)
    t0 = time.perf_counter()
    plan = loads(blob)                              # parse + JSON Schema + semantic validation
    t1 = time.perf_counter()
    opts = CheckOptions()
    res = check_plan(plan, opts)
    t2 = time.perf_counter()
    sha = plan_sha256(plan)
    cert = certificate.build(plan, sha, "plan.json", res, opts)
    cert_bytes = certificate.serialize(cert)
    t3 = time.perf_counter()
    recheck(cert_bytes, blob)
    t4 = time.perf_counter()
    return {"plan": name, "layers": layers, "kv_heads": heads, "positions": t, "verdict": res.verdict(),
            "entries": res.entries, "exact_fallbacks": res.entries_exact,
            "obligations": len(res.obligations),
            "load_validate_s": round(t1 - t0, 3), "check_s": round(t2 - t1, 3),
            "entries_per_s": round(res.entries / (t2 - t1)),
            "filter_s": round(res.timings["filter_s"] + res.timings["expand_s"], 3),
            "smt_s": round(res.timings["smt_s"], 3), "bounds_s": round(res.timings["bounds_s"], 3),
            "certificate_bytes": len(cert_bytes), "recheck_s": round(t4 - t3, 3), "peak_rss_mib": round(peak_mib(), 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip the 32K plan")
    args = ap.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(bench_plan("SmolLM2-shaped, 2K", 30, 3, 9, 64, 2048, tmp))
        rows.append(bench_plan("7B-class, 4K", 32, 8, 32, 128, 4096, tmp))
        if not args.quick:
            rows.append(bench_plan("7B-class, 32K", 32, 8, 32, 128, 32768, tmp))
    if "torch" in sys.modules:
        print("error: torch was imported by the verifier", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("hnfverify check scaling (2-core CPU, one process, z3 for the SMT side)")
    cols = ["plan", "entries", "exact_fallbacks", "check_s", "entries_per_s", "filter_s", "smt_s", "bounds_s",
            "recheck_s", "peak_rss_mib", "verdict"]
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r.get(c, '-')):>15}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
