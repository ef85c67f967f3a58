"""hnfverify against its peers on SmolLM2, same text, same protocol, one run; plus the ablation.

    .venv/bin/python benchmarks/quality.py --out out/bench [--windows 4] [--threads 2]

1. Analysis (calibration split, prose, 2 x 1024 tokens) -> out/bench/report.json (reused if present).
2. Plans: uniform FP8-E4M3 / INT8 / INT4 (per token, group 64); KIVI-style 4 and 2 bit (keys per channel
   in groups of 32 tokens, values per token, FP16 residual window of 128, no sink) through hnfverify's
   own cache; hnfverify --avg-bits 3/4/4.5/5/6/7 and --eps 500/4000; ablation plans.
3. transformers' QuantizedCache (optimum-quanto backend, 4 and 2 bit, residual 128), emulated exactly
   (hnfverify.evaluation.quanto, tested against real decoding).
4. Every method on the same evaluation windows (prose and code, eval split, 512 prefix + 512 scored;
   one reference pass per window): PPL, KLD, top-1, real packed bytes, certified-bound soundness.
5. Decode ms/token vs DynamicCache (real caches, interleaved repeats, medians).
Writes out/bench/quality.json; benchmarks/write_report.py turns it into BENCHMARKS.md and PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_overhead import decode_ms  # noqa: E402  (one decode timer for both benchmarks)
CALIB = dict(corpus="prose", max_tokens=2048, window=1024)
KIVI = {"kivi-4bit": "fp16,K.rest=int4_c32,V.rest=int4_t64", "kivi-2bit": "fp16,K.rest=int2_c32,V.rest=int2_t64"}
#: fixed allocations chosen from measurements on calibration-split text (never the evaluation split): keys per
#: channel in 128-token groups, values per token, an INT8 window of 32, the first 4 tokens in FP16
FIXED = {"hnf-fixed-k4v3": "int8_t64,sink=fp16,K.rest=int4_c128,V.rest=int3_t64",
         "hnf-fixed-k3v3": "int8_t64,sink=fp16,K.rest=int3_c128,V.rest=int3_t64",
         # the same with Hadamard-rotated values (docs/design.md §2.3c)
         "hnf-fixed-k4v3h": "int8_t64,sink=fp16,K.rest=int4_c128,V.rest=int3_t64_h",
         "hnf-fixed-k3v3h": "int8_t64,sink=fp16,K.rest=int3_c128,V.rest=int3_t64_h"}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def quiet_torch(threads: int):
    """torch with ``threads`` threads and transformers without warnings or progress bars (both benchmarks)."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return torch


def analysis(out: Path) -> Path:
    rep = out / "report.json"
    if not rep.exists():
        cmd = [sys.executable, "-m", "hnfverify", "analyze", "--model", "smollm2", "--calib", CALIB["corpus"],
               "--max-tokens", str(CALIB["max_tokens"]), "--window", str(CALIB["window"]), "--quiet",
               "--out", str(rep)]
        log("analyze:", " ".join(cmd[2:]))
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        log(f"analysis {time.perf_counter() - t:.0f} s")
    return rep


# ----------------------------------------------------------------------------------------- plans
def _keys_by_score(summary, arrays, signal: str, target_key_bits: float):
    """Ablation: key formats from a sensitivity score alone (values FP16), the threshold bisected so the
    keys' average bits come as close to the target as possible from below. Theorem 5.7's form
    score * D_f^2 * u_f <= theta for 'exact' (kappa) and 'seed' (the seed's heuristic kappa); the
    original proposal's attention-only score uses alpha_max * u_f <= theta."""
    from hnfverify.core.formats import format_table
    from hnfverify.planning import PlanRequest, build_chain, units_from_report
    from hnfverify.core.numbers import parse_number

    req = PlanRequest(avg_bits=Fraction(16), curvature="seed" if signal == "seed" else "exact")
    table = format_table(summary["shape"]["head_dim"], summary["analysis"]["channel_group"])
    units, meta = units_from_report(summary, arrays, req, table)
    keys = [u for u in units if u.kv == "K"]
    for u in keys:
        build_chain(u, table, req.c)

    def need(u, f):
        if signal == "attention":
            return float(parse_number(u.inputs["alpha"][1])) * float(f.u)
        d = float(f.theorem_diameter(u.stats))
        return float(u.kappa[1]) * d * d * float(f.u)

    def alloc(theta):
        out = []
        for u in keys:
            ok = [f for f in u.chain if need(u, f) <= theta]
            out.append((u, ok[0] if ok else u.chain[-1]))
        return out

    def bits(a):
        tot = sum(u.length for u in keys)
        return sum(float(f.segment_bits(u.length, 1)) for u, f in a) / tot

    lo, hi = -60.0, 20.0                         # log2 theta: hi = everything cheapest
    for _ in range(60):
        mid = (lo + hi) / 2
        if bits(alloc(2 ** mid)) <= target_key_bits:
            hi = mid
        else:
            lo = mid
    a = alloc(2 ** hi)
    assign = [(u.layer, u.head, "K", u.seg, f.name) for u, f in a]
    assign += [(u.layer, u.head, "V", u.seg, "fp16") for u in units if u.kv == "V"]
    return tuple(assign), bits(a)


PREFIX, SCORED = 512, 512


def decode_bits(plan: dict) -> Fraction:
    """Bits per element of the plan's cache averaged over the lengths PREFIX+1 .. PREFIX+SCORED by the byte
    accounting the evaluation's memory curve uses (docs/design.md §4): the budget as BENCHMARKS.md counts it."""
    from hnfverify.core.semantics import norm_bits
    from hnfverify.evaluation.accounting import accounted_bytes, accounting_units

    units, d, s = accounting_units(plan), plan["shape"]["head_dim"], plan["shape"]
    nb = norm_bits(plan["rule"])
    per = [Fraction(accounted_bytes(units, d, n, nb) * 8, 2 * s["layers"] * s["kv_heads"] * n * d)
           for n in range(PREFIX + 1, PREFIX + SCORED + 1)]
    return sum(per) / len(per)


def matched(summary, arrays, req):
    """The plan of ``req`` with its --avg-bits (a budget at max_seq_len) lowered until the bits while decoding
    are at most req.avg_bits: steps down by the excess, a few digits. Returns (plan, the --avg-bits used)."""
    from dataclasses import replace

    from hnfverify.planning import plan_from_report

    budget = a = req.avg_bits
    plan = plan_from_report(summary, arrays, req, "report.json")
    got = decode_bits(plan)
    while got > budget:
        a = min(a - Fraction(1, 1000), Fraction(int((a - (got - budget)) * 1000), 1000))
        plan = plan_from_report(summary, arrays, replace(req, avg_bits=a), "report.json")
        got = decode_bits(plan)
    return plan, a


def build_plans(rep: Path, out: Path) -> list:
    """[(name, group, plan path, plan, note)]"""
    from hnfverify.core.plan import save_plan
    from hnfverify.planning import PlanRequest, plan_from_report
    from hnfverify.analysis.report import load

    summary, arrays = load(rep)
    specs = [
        ("uniform-fp8_e4m3", "peer", PlanRequest(uniform="fp8_e4m3_t64"), "FP8-E4M3, per-token FP16 scale"),
        ("uniform-int8", "peer", PlanRequest(uniform="int8_t64"), "INT8 per token, group 64"),
        ("uniform-int4", "peer", PlanRequest(uniform="int4_t64"), "INT4 per token, group 64"),
        ("kivi-4bit", "peer", PlanRequest(uniform=KIVI["kivi-4bit"], sink=0, recent=128),
         "K int4 per channel (32-token groups), V int4 per token, FP16 residual 128"),
        ("kivi-2bit", "peer", PlanRequest(uniform=KIVI["kivi-2bit"], sink=0, recent=128),
         "K int2 per channel (32-token groups), V int2 per token, FP16 residual 128"),
        ("uniform-int3", "peer", PlanRequest(uniform="int3_t64"), "INT3 per token, group 64"),
        ("kivi-4bit-nores", "peer", PlanRequest(uniform="int4_t64,K.rest=int4_c32", sink=0, recent=0),
         "K int4 per channel (32-token groups), V int4 per token, no residual window (the incomplete group exact)"),
        ("kivi-2bit-nores", "peer", PlanRequest(uniform="int2_t64,K.rest=int2_c32", sink=0, recent=0),
         "K int2 per channel (32-token groups), V int2 per token, no residual window (the incomplete group exact)"),
        ("quarot-int4", "peer", PlanRequest(uniform="int4_t64_h", sink=0, recent=0),
         "QuaRot-style: K and V Hadamard-rotated, INT4 per token (group = head_dim 64), no residual"),
        ("quarot-int3", "peer", PlanRequest(uniform="int3_t64_h", sink=0, recent=0),
         "QuaRot-style: K and V Hadamard-rotated, INT3 per token (group = head_dim 64), no residual"),
    ]
    for b in ("3", "3.5", "4", "4.5", "5", "6", "7", "8"):
        specs.append((f"hnf-avg{b}", "hnfverify", PlanRequest(avg_bits=Fraction(b)), f"--avg-bits {b} (objective fisher)"))
    for b in ("3", "3.5", "4", "4.4"):
        specs.append((f"hnf-avg{b}-r32", "hnfverify", PlanRequest(avg_bits=Fraction(b), recent=32),
                      f"--avg-bits {b} --recent 32 (objective fisher)"))
    for name, spec in FIXED.items():
        specs.append((name, "hnfverify", PlanRequest(uniform=spec, recent=32),
                      f"--uniform {spec} --recent 32 (formats chosen on calibration text, not by the planner)"))
    for e in ("500", "4000"):
        specs.append((f"hnf-eps{e}", "hnfverify", PlanRequest(eps=Fraction(e)), f"--eps {e}"))
    for b in ("3", "4.5"):
        specs.append((f"abl-avg{b}-group128", "ablation", PlanRequest(avg_bits=Fraction(b), channel_group=128),
                      f"--avg-bits {b} --channel-group 128: one channel group (vs hnf-avg{b}: each unit picks)"))
    for b in ("3", "4"):
        specs.append((f"abl-avg{b}-no-codebooks", "ablation", PlanRequest(avg_bits=Fraction(b), codebooks=False),
                      f"--avg-bits {b} --no-codebooks: uniform grids only (vs hnf-avg{b}: codebooks allowed)"))
        specs.append((f"abl-avg{b}-no-rotation", "ablation", PlanRequest(avg_bits=Fraction(b), rotation=False),
                      f"--avg-bits {b} --no-rotation: no Hadamard-rotated formats (vs hnf-avg{b}: rotation allowed)"))
    specs += [
        ("abl-avg4.5-objective-linear", "ablation", PlanRequest(avg_bits=Fraction("4.5"), objective="linear"),
         "--avg-bits 4.5 --objective linear (vs hnf-avg4.5: objective fisher)"),
        ("abl-avg3-objective-linear", "ablation", PlanRequest(avg_bits=Fraction("3"), objective="linear"),
         "--avg-bits 3 --objective linear (vs hnf-avg3: objective fisher)"),
        ("abl-avg4.5-objective-layers", "ablation", PlanRequest(avg_bits=Fraction("4.5"), objective="layers"),
         "--avg-bits 4.5 --objective layers (vs hnf-avg4.5: objective fisher)"),
        ("abl-avg4.5-objective-e2e", "ablation", PlanRequest(avg_bits=Fraction("4.5"), objective="end_to_end"),
         "--avg-bits 4.5 --objective end_to_end (vs hnf-avg4.5: objective fisher)"),
        ("abl-fixed-k4v3-c32", "ablation", PlanRequest(uniform=FIXED["hnf-fixed-k4v3"].replace("c128", "c32"),
                                                      recent=32),
         "hnf-fixed-k4v3 with 32-token key groups (vs 128)"),
        ("abl-avg4-no-sink-recent", "ablation", PlanRequest(avg_bits=Fraction(4), sink=0, recent=0),
         "--avg-bits 4 --sink 0 --recent 0 (vs hnf-avg4: sink 4, recent 64)"),
        ("abl-K-int4", "ablation", PlanRequest(uniform="fp16,K=int4_t64"), "keys INT4 g64, values FP16"),
        ("abl-V-int4", "ablation", PlanRequest(uniform="fp16,V=int4_t64"), "keys FP16, values INT4 g64"),
        ("abl-K-int2", "ablation", PlanRequest(uniform="fp16,K=int2_t64"), "keys INT2 g64, values FP16"),
        ("abl-V-int2", "ablation", PlanRequest(uniform="fp16,V=int2_t64"), "keys FP16, values INT2 g64"),
    ]
    key_target = 4.5                              # = uniform int4_t64 keys (abl-K-int4)
    for sig, label in (("exact", "exact curvature kappa D^2"), ("attention", "attention-only alpha_max"),
                       ("seed", "the seed's heuristic kappa D^2")):
        assign, kb = _keys_by_score(summary, arrays, sig, key_target)
        specs.append((f"abl-keys-{sig}", "ablation", PlanRequest(assign=assign),
                      f"keys by {label} at {kb:.3f} key bits (target {key_target}), values FP16"))
    plans = []
    (out / "plans").mkdir(parents=True, exist_ok=True)
    for name, group, req, note in specs:
        if req.avg_bits is not None:
            # the budgets are bits per element while decoding (PREFIX+1 .. PREFIX+SCORED), as the report counts them
            plan, a = matched(summary, arrays, req)
            note += f"; planned at --avg-bits {a} ({float(a):.3f}) to hold at most {req.avg_bits} bits while decoding"
        else:
            plan = plan_from_report(summary, arrays, req, "report.json")
        path = out / "plans" / f"{name}.json"
        save_plan(plan, path)
        plans.append((name, group, path, plan, note))
    return plans


def check_plans(plans) -> dict:
    """hnfverify check on every plan (its verdict is part of the table)."""
    res = {}
    for name, _, path, _, _ in plans:
        r = subprocess.run([sys.executable, "-m", "hnfverify", "check", str(path), "--format", "json",
                            "--cert-dir", str(path.parent / "certs")], capture_output=True, text=True)
        try:
            verdict = json.loads(r.stdout)["verdict"]
        except (ValueError, KeyError):
            verdict = f"exit {r.returncode}"
        res[name] = verdict
    return res


# ----------------------------------------------------------------------------------------- timing
def timing(lm, makers: dict, repeats: int, steps: int) -> dict:
    import torch

    from hnfverify.texts import token_windows

    ids = torch.tensor(token_windows(lm.tokenizer, "prose", split="eval", max_tokens=512, window=512).windows)
    res = {k: [] for k in makers}
    for _ in range(repeats):
        for k, mk in makers.items():
            res[k].append(decode_ms(lm, ids, mk(), steps))
    return {k: {"ms_per_token_median": statistics.median(v), "runs": v} for k, v in res.items()}


TIMED = ["uniform-fp8_e4m3", "uniform-int8", "uniform-int4", "uniform-int3", "kivi-4bit", "kivi-2bit", "hnf-avg3",
         "hnf-avg4", "hnf-avg4.5", "hnf-avg5", "hnf-avg6", "hnf-avg7", "hnf-eps500", "hnf-eps4000", "hnf-fixed-k4v3"]


def timing_makers(lm, by_name: dict) -> dict:
    """The caches timed: the full cache, the plans of TIMED through MixedPrecisionCache, quanto int4 / int2."""
    from transformers import DynamicCache

    from hnfverify.evaluation.quanto import quanto_cache
    from hnfverify.kv.cache import MixedPrecisionCache

    cfg = lm.model.config
    makers = {"full": lambda: DynamicCache(config=cfg)}
    makers.update({n: (lambda p=by_name[n]: MixedPrecisionCache.from_plan(p, lm.model)) for n in TIMED})
    makers["quanto-int4"] = lambda: quanto_cache(cfg, 4)
    makers["quanto-int2"] = lambda: quanto_cache(cfg, 2)
    return makers


def retime(args) -> int:
    """--retime: time the decode again (same plans, same protocol) and update quality.json's decode figures
    only. The quality figures stand: they come from the teacher-forced evaluation, which the cache's
    implementation does not enter (and the cache stores bit for bit what it did, tests/kv/test_cache_layout.py)."""
    import torch
    from transformers.utils import logging as hf_logging

    from hnfverify.core.plan import load_plan
    from hnfverify.models import load_model

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    q = json.loads((out / "quality.json").read_text())
    lm = load_model("smollm2", verbose=False)
    by_name = {r["method"]: load_plan(r["plan"]) for r in q["rows"] if r["method"] in TIMED}
    t = time.perf_counter()
    times = timing(lm, timing_makers(lm, by_name), args.repeats, args.steps)
    log(f"decode timing in {time.perf_counter() - t:.0f} s")
    for r in q["rows"]:
        if r["method"] in times:
            r["decode"] = times[r["method"]]
    q["full_decode"] = times["full"]
    q["timing"] = {"repeats": args.repeats, "steps": args.steps, "prefill": 512,
                   "retimed": time.strftime("%Y-%m-%d"), "torch_threads": args.threads}
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(q, indent=1, sort_keys=True))
    os.replace(tmp, out / "quality.json")
    log(f"updated the decode figures of {out / 'quality.json'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows per corpus")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--retime", action="store_true",
                    help="only time the decode again and update quality.json's decode figures")
    args = ap.parse_args()
    if args.retime:
        return retime(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rep = analysis(out)

    torch = quiet_torch(args.threads)
    from hnfverify.evaluation import evaluate_methods, plan_method
    from hnfverify.models import load_model
    from hnfverify.evaluation.quanto import quanto_method
    from hnfverify.core.plan import claim_float

    t = time.perf_counter()
    plans = build_plans(rep, out)
    log(f"{len(plans)} plans in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    verdicts = check_plans(plans)
    log(f"checked in {time.perf_counter() - t:.0f} s: {verdicts}")
    lm = load_model("smollm2", verbose=False)
    methods = [plan_method(name, plan) for name, _, _, plan, _ in plans]
    methods += [quanto_method(4, name="quanto-int4"), quanto_method(2, name="quanto-int2")]
    evals = {}
    for corpus in ("prose", "code"):
        t = time.perf_counter()
        evals[corpus] = evaluate_methods(lm, methods, corpus, windows=args.windows)
        log(f"eval {corpus}: {len(methods)} methods x {args.windows} windows in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    times = timing(lm, timing_makers(lm, {name: plan for name, _, _, plan, _ in plans}), args.repeats, args.steps)
    log(f"decode timing in {time.perf_counter() - t:.0f} s")
    rows = []
    meta = {name: (group, str(path), note, plan) for name, group, path, plan, note in plans}
    for m in methods:
        group, path, note, plan = meta.get(m.name, ("peer", None, m.protocol, None))
        row = {"method": m.name, "group": group, "plan": path, "note": note,
               "check": verdicts.get(m.name), "eval": {c: evals[c][m.name] for c in evals},
               "decode": times.get(m.name)}
        if plan is not None:
            row["plan_avg_bits"] = float(Fraction(plan["claims"]["avg_bits"]))
            row["attention_error_bound_max"] = max(claim_float(x) for x in plan["claims"]["attention_error_max"])
            row["end_to_end_bound"] = claim_float(plan["claims"]["end_to_end_bound"])
        rows.append(row)
    import platform

    import transformers

    result = {
        "rows": rows, "full_decode": times["full"],
        "calibration": CALIB, "windows_per_corpus": args.windows, "prefix": 512, "scored": 512,
        "threads": args.threads, "timing": {"repeats": args.repeats, "steps": args.steps, "prefill": 512},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "optimum-quanto": _version("optimum-quanto"), "z3-solver": _version("z3-solver")},
        "seconds": time.perf_counter() - t_all,
    }
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, out / "quality.json")
    log(f"wrote {out / 'quality.json'} ({result['seconds']:.0f} s)")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
