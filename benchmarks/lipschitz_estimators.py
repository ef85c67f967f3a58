"""The analyzer's Lipschitz estimates (Golub-Kahan-Lanczos, docs/design.md §2.5a) against the power iteration
it replaced, on SmolLM2's 30 decoder blocks at a prose calibration prefix: per layer the ratio of the
analyzer's L_l (block) and L'_l (rest of block) to 6 power iterations' estimate, and the time of each.

    .venv/bin/python benchmarks/lipschitz_estimators.py [--tokens 32] [--steps 5] [--power 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def power_iteration(fn, x, iters: int, seed: int = 0) -> float:
    """||J v_k|| after k power iterations on J^T J (the estimator before §2.5a), same start as jacobian_norm."""
    import torch

    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    v = v / v.norm()
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        y = fn(xg)
        u0 = torch.zeros_like(y, requires_grad=True)
        (jtu,) = torch.autograd.grad(y, xg, u0, create_graph=True)
        sigma = 0.0
        for _ in range(iters):
            (jv,) = torch.autograd.grad(jtu, u0, v, retain_graph=True)
            sigma = float(jv.norm())
            (jtjv,) = torch.autograd.grad(y, xg, jv.detach(), retain_graph=True)
            v = jtjv.detach() / jtjv.norm()
    return sigma


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--power", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from hnfverify.analysis.analyzer import _layer_blocks
    from hnfverify.analysis.lipschitz import (block_lipschitz, capture_block_inputs, capture_mid_states,
                                              mlp_lipschitz, rest_of_block)
    from hnfverify.analysis.routing import routed_attention
    from hnfverify.models import load_model
    from hnfverify.texts import token_windows

    lm = load_model("smollm2", verbose=False)
    wins = token_windows(lm.tokenizer, "prose", max_tokens=1024, window=512)
    model = lm.model
    blocks = _layer_blocks(model)
    ids = torch.tensor([wins.windows[0][:args.tokens]])
    with torch.no_grad(), capture_block_inputs(model, blocks) as cap, capture_mid_states(blocks) as mid:
        (getattr(model, "base_model", None) or model)(input_ids=ids, use_cache=False)
    ratios = {"block": [], "rest": []}
    times = {"lanczos": 0.0, "power": 0.0}
    with routed_attention(model, "eager"):
        for li in sorted(blocks):
            t = time.perf_counter()
            b = block_lipschitz(blocks[li], *cap[li], iters=args.steps, route=False).value
            m = mlp_lipschitz(blocks[li], mid[li], iters=args.steps).value
            times["lanczos"] += time.perf_counter() - t
            a_, kw = cap[li]
            kw = {k: (None if k in ("cache", "past_key_values", "past_key_value") else v) for k, v in kw.items()}
            kw["use_cache"] = False
            blk = blocks[li]

            def fb(x, blk=blk, rest=a_[1:], kw=kw):
                out = blk(x, *rest, **kw)
                return out[0] if isinstance(out, tuple) else out

            t = time.perf_counter()
            pb = power_iteration(fb, a_[0].float(), args.power)
            pm = power_iteration(rest_of_block(blk).at(mid[li].layer_input.float()), mid[li].attention_output.float(), args.power)
            times["power"] += time.perf_counter() - t
            ratios["block"].append(b / pb)
            ratios["rest"].append(m / pm)
    print(f"SmolLM2, {len(blocks)} layers, {args.tokens} prose tokens, {args.threads} threads: Lanczos {args.steps} "
          f"steps / power iteration {args.power} iterations")
    for k, r in ratios.items():
        print(f"  {k:5}  min {min(r):.3f}  median {statistics.median(r):.3f}  max {max(r):.3f}")
    print(f"  time (one thread of layers): Lanczos {times['lanczos']:.2f} s, power {times['power']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
