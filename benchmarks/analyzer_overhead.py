"""Analyzer wall time / plain forward wall time over the same calibration tokens (SmolLM2, CPU).

The ratios are of the statistics and the block Lipschitz estimate (the analyzer-speed goal); the suffix
sensitivities (docs/design.md §2.5) and the measured Fisher sensitivities (§3.1), both on by default in
``hnfverify analyze``, are measured in a separate run and reported on their own (``suffix_s``, ``fisher_s``:
the time the analysis spends on each; the Fisher pass is one forward and backward per window).

Default: 2 windows x 512 tokens of the prose calibration split, torch threads fixed, runs
interleaved and repeated, medians reported. Also reports peak RSS of a separate 2048-token
analysis (4 x 512) in a fresh process.

    .venv/bin/python benchmarks/analyzer_overhead.py [--repeats 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MEM_SNIPPET = r"""
import resource, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from hnfverify.models import load_model
from hnfverify.texts import token_windows
from hnfverify.analysis.analyzer import analyze, AnalysisOptions
lm = load_model("smollm2", verbose=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
w = token_windows(lm.tokenizer, "prose", max_tokens=2048, window=512)
analyze(lm, w, AnalysisOptions(suffix_iters=0, fisher_tokens=0))
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _memory(threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", MEM_SNIPPET, str(threads)], capture_output=True, text=True,
                       env=dict(os.environ))
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1:]}
    base, peak = (int(x) for x in r.stdout.split()[-2:])
    return {"peak_rss_mib": round(peak / 1024, 1), "rss_after_model_load_mib": round(base / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    # the memory run first, from a small parent: Linux keeps a forked child's peak RSS (ru_maxrss) across
    # exec, so a child forked from this process after it loaded the model would report the parent's peak
    memory = None if args.no_memory else _memory(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from hnfverify.analysis.analyzer import AnalysisOptions, analyze
    from hnfverify.models import load_model
    from hnfverify.texts import token_windows

    lm = load_model("smollm2", verbose=False)
    wins = token_windows(lm.tokenizer, "prose", max_tokens=args.tokens, window=args.window)

    def plain():
        with torch.no_grad():
            for w in wins.windows:
                lm.model(input_ids=torch.tensor([w]), use_cache=False)

    runs = {"plain": [], "analyze_no_lipschitz": [], "analyze_default": [], "suffix_s": [], "fisher_s": []}
    plain()  # warm-up
    for _ in range(args.repeats):
        t = time.perf_counter(); plain(); runs["plain"].append(time.perf_counter() - t)
        t = time.perf_counter(); analyze(lm, wins, AnalysisOptions(lipschitz_iters=0, suffix_iters=0, fisher_tokens=0))
        runs["analyze_no_lipschitz"].append(time.perf_counter() - t)
        t = time.perf_counter(); analyze(lm, wins, AnalysisOptions(suffix_iters=0, fisher_tokens=0))
        runs["analyze_default"].append(time.perf_counter() - t)
        full = analyze(lm, wins, AnalysisOptions()).timings
        runs["suffix_s"].append(full["suffix_s"])
        runs["fisher_s"].append(full["fisher_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "model": "smollm2", "tokens": wins.n_tokens, "windows": len(wins.windows), "threads": args.threads,
        "repeats": args.repeats, "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio_analyze_no_lipschitz_over_plain": round(med["analyze_no_lipschitz"] / med["plain"], 2),
        "ratio_analyze_default_over_plain": round(med["analyze_default"] / med["plain"], 2),
        "lipschitz_default": {"tokens": AnalysisOptions().lipschitz_tokens, "iters": AnalysisOptions().lipschitz_iters},
        "suffix_default": {"tokens": AnalysisOptions().suffix_tokens, "iters": AnalysisOptions().suffix_iters},
        "fisher_default": {"tokens": AnalysisOptions().fisher_tokens, "labels": AnalysisOptions().fisher_labels},
        "ratio_fisher_over_plain": round(med["fisher_s"] / med["plain"], 2),
    }
    if memory is not None:
        result["memory_2048_tokens"] = memory
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"analyzer overhead on SmolLM2, {result['windows']} x {args.window} prose calibration tokens, "
              f"{args.threads} threads, median of {args.repeats}")
        for k, v in result["median_s"].items():
            print(f"  {k:24} {v:8.3f} s")
        print(f"  ratio analyze (no Lipschitz) / plain forward : {result['ratio_analyze_no_lipschitz_over_plain']}")
        print(f"  ratio analyze (default, Lipschitz on {result['lipschitz_default']['tokens']} tokens x "
              f"{result['lipschitz_default']['iters']} iters) / plain : {result['ratio_analyze_default_over_plain']}")
        print(f"  suffix sensitivities (separately; {result['suffix_default']['tokens']} tokens x "
              f"{result['suffix_default']['iters']} iters): {result['median_s']['suffix_s']} s")
        print(f"  Fisher sensitivities (separately; forward + backward per window): {result['median_s']['fisher_s']} s "
              f"({result['ratio_fisher_over_plain']}x the plain forward)")
        if "memory_2048_tokens" in result:
            print(f"  2048-token analysis: {result['memory_2048_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
