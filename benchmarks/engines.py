"""Every llama.cpp KV-cache type pair (K x V) and vLLM's FP8 cache on SmolLM2, next to hnfverify's mixed plans at
equal bytes: bits, KLD, PPL, top-1 and the certified bounds, all on the same evaluation windows.

    .venv/bin/python benchmarks/engines.py --out out/bench [--windows 2] [--threads 2]

1. The calibration analysis out/bench/report.json (benchmarks/quality.py's; made if absent).
2. Per setting the plan ``hnfverify certify-engine`` builds (every position of every layer and head in the engine's
   type, no sink, no recent window, no recorded error norms: the engine's own bytes), checked by the gate.
   llama.cpp: K, V in q8_0, q5_1, q5_0, q4_1, iq4_nl, q4_0 (36 pairs); vLLM fp8_e4m3 with scale 1.0 (its default) and
   with per-(layer, K|V) scales amax / 448 from the calibration analysis (what ``hnfverify export --to vllm``
   writes).
3. hnfverify ``--avg-bits B`` plans from the same analysis at the engines' bit widths (4 to 8.5: below 4.5 too, as a
   plan's recent window and sink make it decode above its budget).
4. Every method on the same windows (prose and code, eval split, 512 prefix + 512 scored, one reference pass per
   window). Writes out/bench/engines.json; benchmarks/write_report.py renders it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import analysis, log, quiet_torch  # noqa: E402  (the same calibration analysis and set-up)

TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0")
HNF_BITS = ("4", "4.2", "4.5", "5", "5.5", "6", "6.5", "7", "8.5")


def engine_plans(rep: Path, out: Path) -> list:
    """(name, group, plan path, plan, setting) for every engine setting."""
    from hnfverify.analysis.report import load
    from hnfverify.cli.engine_commands import argparse_ns, engine_request, vllm_scales
    from hnfverify.core.plan import save_plan
    from hnfverify.planning.planner import plan_with_estimate

    summary, arrays = load(rep)
    pdir = out / "plans"
    pdir.mkdir(parents=True, exist_ok=True)
    settings = [(f"llama.cpp {k}/{v}", argparse_ns(engine="llama.cpp", ctk=k, ctv=v)) for k in TYPES for v in TYPES]
    settings.append(("vllm fp8 s=1", argparse_ns(engine="vllm", kv_cache_dtype="fp8_e4m3")))
    scales = pdir / "vllm-scales.json"
    scales.write_text(json.dumps(vllm_scales(summary, arrays)))
    settings.append(("vllm fp8 calibrated", argparse_ns(engine="vllm", kv_cache_dtype="fp8_e4m3", scales=str(scales))))
    plans = []
    for name, ns in settings:
        req, setting = engine_request(ns, summary["shape"])
        plan, _ = plan_with_estimate(summary, arrays, req, rep.name)
        path = pdir / f"engine-{name.replace(' ', '-').replace('/', '-')}.json"
        save_plan(plan, path)
        plans.append((name, "engine", path, plan, setting))
    for b in HNF_BITS:
        from hnfverify.planning import PlanRequest

        plan, _ = plan_with_estimate(summary, arrays, PlanRequest(avg_bits=Fraction(b)), rep.name)
        path = pdir / f"engine-hnf-avg{b}.json"
        save_plan(plan, path)
        plans.append((f"hnf-avg{b}", "hnfverify", path, plan, f"hnfverify plan --avg-bits {b}"))
    return plans


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--windows", type=int, default=2, help="evaluation windows per corpus")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rep = analysis(out)

    quiet_torch(args.threads)
    from hnfverify.core.plan import claim_float
    from hnfverify.core.verify.obligations import CheckOptions, check_plan
    from hnfverify.evaluation import evaluate_methods, plan_method
    from hnfverify.models import load_model

    plans = engine_plans(rep, out)
    verdicts = {name: check_plan(plan, CheckOptions()).verdict() for name, _, _, plan, _ in plans}
    log(f"{len(plans)} plans checked: {verdicts}")
    lm = load_model("smollm2", verbose=False)
    methods = [plan_method(name, plan) for name, _, _, plan, _ in plans]
    evals = {}
    for corpus in ("prose", "code"):
        t = time.perf_counter()
        evals[corpus] = evaluate_methods(lm, methods, corpus, windows=args.windows)
        log(f"eval {corpus}: {len(methods)} methods x {args.windows} windows in {time.perf_counter() - t:.0f} s")
    rows = []
    for name, group, path, plan, setting in plans:
        rows.append({"method": name, "group": group, "plan": str(path), "setting": setting, "check": verdicts[name],
                     "plan_avg_bits": float(Fraction(plan["claims"]["avg_bits"])),
                     "attention_error_bound_max": max(claim_float(x) for x in plan["claims"]["attention_error_max"]),
                     "end_to_end_bound": claim_float(plan["claims"]["end_to_end_bound"]),
                     "eval": {c: evals[c][name] for c in evals}})
    result = {"rows": rows, "windows_per_corpus": args.windows, "prefix": 512, "scored": 512, "threads": args.threads,
              "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t_all}
    tmp = out / "engines.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, out / "engines.json")
    log(f"wrote {out / 'engines.json'} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
