"""Decode speed and memory of plan caches against the full cache and quanto's QuantizedCache, SmolLM2 on CPU.

Speed, per context length L (default 1024, 4096 and 8160): prefill L prose tokens (evaluation split;
the code split where prose is too short), then time ``--steps`` greedy decode steps one by one.
Every cache runs in this one process with the same thread count, interleaved, ``--repeats`` times; the
figure is the median step. Caches: DynamicCache (float32, the model's stock sdpa), quanto's
``QuantizedCache`` (int4 and int2, residual 128, group 64, as BENCHMARKS.md runs it) and each plan's
``MixedPrecisionCache``; a plan whose ``max_seq_len`` does not cover L + steps runs with
``on_overflow="warn"`` and is marked ``covers: false``.

Memory, per cache and L: a fresh process (this script with ``--rss``) loads the model, runs one short
warm-up pass, and reports the growth of its resident set (VmRSS, /proc/self/status) from before the
prefill to the end of the decode, with the cache's own count of its bytes. Allocations above 1 MiB are
mmapped (``MALLOC_MMAP_THRESHOLD_``) so that memory the program freed leaves the resident set, for
every cache alike.

    .venv/bin/python benchmarks/cache_overhead.py [PLAN ...] [--contexts 1024 4096 8160] [--json]   (make bench-long)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def decode_ms(lm, ids, cache, steps: int) -> float:
    """Median ms of ``steps`` greedy decode steps after prefilling ``ids`` into ``cache``."""
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


def prompt(lm, length: int):
    """(1, length) token ids of evaluation text: prose, or code where prose is too short."""
    import torch

    from hnfverify.errors import InputError
    from hnfverify.texts import token_windows

    ids = []
    for corpus in ("prose", "code"):
        try:
            w = token_windows(lm.tokenizer, corpus, split="eval", max_tokens=length - len(ids), window=length - len(ids))
        except InputError:                                  # too short for the length: the next corpus
            continue
        ids += w.windows[0]
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise SystemExit(f"the evaluation split has {len(ids)} tokens, fewer than {length}")
    return torch.tensor([ids[:length]])


def makers(lm, plans: dict) -> dict:
    from transformers import DynamicCache

    from hnfverify.evaluation.quanto import quanto_cache
    from hnfverify.kv.cache import MixedPrecisionCache

    cfg = lm.model.config
    out = {"DynamicCache": lambda: DynamicCache(config=cfg),
           "quanto-int4": lambda: quanto_cache(cfg, 4), "quanto-int2": lambda: quanto_cache(cfg, 2)}
    for name, plan in plans.items():
        out[name] = lambda p=plan: MixedPrecisionCache.from_plan(p, lm.model, on_overflow="warn")
    return out


def covers(plan: dict, length: int, steps: int) -> bool:
    return plan["max_seq_len"] >= length + steps


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_child(args) -> int:
    """--rss: one cache, one length, in this fresh process; prints one JSON line."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from hnfverify.core.plan import load_plan
    from hnfverify.models import load_model

    lm = load_model("smollm2", verbose=False)
    plans = {args.rss: load_plan(args.rss)} if args.rss not in ("DynamicCache", "quanto-int4", "quanto-int2") else {}
    ids = prompt(lm, args.contexts[0])
    mk = makers(lm, plans)[args.rss]
    decode_ms(lm, ids[:, :16], mk(), 2)                    # warm-up: allocator, kernels, lazy imports
    before = rss_kib()
    cache = mk()
    decode_ms(lm, ids, cache, args.steps)
    after = rss_kib()
    nbytes = cache.nbytes() if hasattr(cache, "nbytes") else None
    print(json.dumps({"rss_growth_mib": (after - before) / 1024, "cache_nbytes_mib": None if nbytes is None else
                      nbytes / 2 ** 20}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="*", default=["out/bench/long/plan-4.5bits.json", "out/bench/long/plan-int4.json",
                                                 "out/bench/long/plan-kivi4.json"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8160],
                    help="prefill lengths (8160 + 32 steps = 8192, SmolLM2's and the 8K plans' max_seq_len)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-rss", action="store_true", help="skip the per-cache memory processes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rss", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss:
        return rss_child(args)
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from hnfverify.core.plan import claim_float, load_plan
    from hnfverify.models import load_model

    t0 = time.perf_counter()
    lm = load_model("smollm2", verbose=False)
    plans = {p: load_plan(p) for p in args.plans}
    cfg = lm.model.config
    res = {"threads": args.threads, "steps": args.steps, "repeats": args.repeats, "torch": torch.__version__,
           "shape": {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
                     "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads},
           "plans": {p: {"avg_bits": claim_float(pl["claims"]["avg_bits"]), "max_seq_len": pl["max_seq_len"]}
                     for p, pl in plans.items()},
           "contexts": {}}
    for length in args.contexts:
        ids = prompt(lm, length)
        mks = makers(lm, plans)
        runs = {k: [] for k in mks}
        for _ in range(args.repeats):
            for k, mk in mks.items():
                runs[k].append(decode_ms(lm, ids, mk(), args.steps))
        full = statistics.median(runs["DynamicCache"])
        q4, q2 = statistics.median(runs["quanto-int4"]), statistics.median(runs["quanto-int2"])
        row = {}
        for k, v in runs.items():
            m = statistics.median(v)
            row[k] = {"ms_per_token": m, "runs": v, "vs_full": m / full, "vs_quanto_int4": m / q4,
                      "vs_quanto_int2": m / q2}
            if k in plans:
                row[k]["covers"] = covers(plans[k], length, args.steps)
        if not args.no_rss:
            for k in mks:
                r = subprocess.run([sys.executable, __file__, "--rss", k, "--contexts", str(length), "--steps",
                                    str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True,
                                   cwd=ROOT, env={**os.environ, **RSS_ENV})
                try:
                    row[k].update(json.loads(r.stdout.strip().splitlines()[-1]))
                except (ValueError, IndexError):
                    row[k]["rss_error"] = (r.stderr or r.stdout)[-400:]
        res["contexts"][str(length)] = row
        if not args.json:
            print(f"context {length}: decode ms/token (median of {args.steps} steps x {args.repeats} interleaved "
                  f"repeats, {args.threads} threads)")
            for k, v in row.items():
                mem = f"   RSS +{v['rss_growth_mib']:7.1f} MiB" if "rss_growth_mib" in v else ""
                nb = f" (cache {v['cache_nbytes_mib']:6.1f} MiB)" if v.get("cache_nbytes_mib") is not None else ""
                cov = "" if v.get("covers", True) else "  [past the plan's max_seq_len: uncertified]"
                print(f"  {k:28} {v['ms_per_token']:8.2f} ms/token  x{v['vs_full']:5.2f} full  "
                      f"x{v['vs_quanto_int4']:5.2f} quanto-int4{mem}{nb}{cov}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
