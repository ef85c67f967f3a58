"""Decode time per token: MixedPrecisionCache (a plan) vs DynamicCache, SmolLM2 on CPU, measured
side by side in one process (interleaved, medians). Prefill 512 prose tokens (evaluation split),
then greedy decoding of 64 tokens timed step by step.

    .venv/bin/python benchmarks/cache_overhead.py [PLAN ...] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def decode_ms(lm, ids, cache, steps: int) -> float:
    import torch

    with torch.no_grad():
        out = lm.model(input_ids=ids, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = lm.model(input_ids=nxt, cache=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            nxt = out.logits[:, -1:].argmax(-1)
    return 1000 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="*", default=["out/plan.json", "out/plan-4.5bits.json"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    import torch
    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from hnfverify.kv.cache import MixedPrecisionCache
    from hnfverify.models import load_model
    from hnfverify.core.plan import load_plan
    from hnfverify.texts import token_windows

    lm = load_model("smollm2", verbose=False)
    ids = torch.tensor(token_windows(lm.tokenizer, "prose", split="eval", max_tokens=512, window=512).windows)
    plans = [(p, load_plan(p)) for p in args.plans]
    res = {"DynamicCache": []}
    res.update({p: [] for p, _ in plans})
    for _ in range(args.repeats):
        res["DynamicCache"].append(decode_ms(lm, ids, DynamicCache(), args.steps))
        for p, plan in plans:
            res[p].append(decode_ms(lm, ids, MixedPrecisionCache.from_plan(plan, lm.model), args.steps))
    base = statistics.median(res["DynamicCache"])
    print(f"decode ms/token after a 512-token prefill, median of {args.steps} steps x {args.repeats} interleaved "
          f"repeats, {args.threads} threads")
    for k, v in res.items():
        m = statistics.median(v)
        print(f"  {k:28} {m:8.2f} ms/token   ratio vs DynamicCache {m / base:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
