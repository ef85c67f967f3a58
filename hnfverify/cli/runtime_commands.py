"""``hnfverify eval`` and ``generate``: the plan's cache on a real model."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from typing import TextIO

from ..errors import EXIT_OK, InvalidArgument
from .options import check_text, quiet_transformers, set_threads
from .render import print_eval


def cmd_eval(args, out: TextIO, err: TextIO) -> int:
    from ..errors import EXIT_VIOLATED
    from ..core.plan import load_plan

    if args.windows <= 0 or args.prefix <= 0 or args.scored <= 0:
        raise InvalidArgument("--windows, --prefix and --scored must be positive")
    texts = args.text or ["prose", "code"]
    for t in texts:
        check_text(t)
    plan = load_plan(args.plan)
    set_threads(args.threads)
    quiet_transformers()
    from ..evaluation import evaluate
    from ..models import check_plan_matches_model, load_model

    lm = load_model(args.model, verbose=not args.quiet)
    check_plan_matches_model(plan, lm.model)            # before the evaluation's long passes
    rows = [evaluate(lm, plan, t, windows=args.windows, prefix=args.prefix, scored=args.scored,
                     progress=not args.quiet and err.isatty()) for t in texts]
    if args.format == "json":
        for r in rows:
            out.write(json.dumps(r, sort_keys=True) + "\n")
    else:
        print_eval(rows, plan, out)
    bad = sum(r["bound_violations"] + r["end_to_end_violations"] + (r["runtime_bound_violations"] or 0)
              + sum((r["output"] or {}).get(k, 0) for k in ("logit_bound_violations", "kl_bound_violations",
                                                          "greedy_certified_but_changed",
                                                          "runtime_logit_bound_violations", "runtime_kl_bound_violations",
                                                          "runtime_greedy_certified_but_changed")) for r in rows)
    if bad:
        print(f"hnfverify eval: {bad} CERTIFIED BOUND(S) EXCEEDED - the plan's claim does not stand", file=err)
        return EXIT_VIOLATED
    return EXIT_OK


def print_certificate(cert, plan: dict, err: TextIO) -> None:
    """The run-time certificate of a generation (docs/design.md §2.4b): per layer the largest certified
    attention-output error over every step and KV head, next to the plan-time bound; the monitor."""
    from ..evaluation.attention import head_bounds

    plan_b, _, _ = head_bounds(plan)
    lm_ = cert.layer_max()
    print(f"run-time certificate: {len(cert.steps)} forward passes; largest certified ||o~ - o|| per layer "
          "(max over steps, KV heads and query heads) | plan-time E_h max", file=err)
    for li in range(lm_.shape[0]):
        pt = max(plan_b[(li, h)] for h in range(lm_.shape[1]))
        print(f"  layer {li:>3}: {float(lm_[li].max()):.4g} | {pt:.4g}", file=err)
    mon = cert.monitor
    print(f"monitor (outside the plan's measured assumptions): {mon['queries_above_q_max']} query norms above q_max, "
          f"{mon['keys_above_amax']} keys and {mon['values_above_amax']} values above the measured amax", file=err)


def print_greedy_certificate(model, cert, plan: dict, seq, n_prompt: int, logits: list, err: TextIO) -> None:
    """Per generated token the run-time claim "same greedy token as the full-precision cache" (docs/design.md
    §2.6), then checked: the full-precision model on the same tokens (teacher-forced, no quantized cache)."""
    import torch

    from ..kv.certify import greedy_certificate

    g = greedy_certificate(cert, plan, logits, seq[0, n_prompt:].tolist())
    if g is None:
        print("greedy certificate: none (the plan composes by products: no claim about the logits)", file=err)
        return
    with torch.no_grad():
        ref = model(input_ids=seq[:, :-1], use_cache=False).logits[0, n_prompt - 1:]
    ref_top = ref.argmax(-1).tolist()
    q_top = [int(x[0].argmax()) for x in logits]
    changed = [a != b for a, b in zip(ref_top, q_top)]
    n = len(g["certified"])
    k = sum(g["certified"])
    bad = sum(c and ch for c, ch in zip(g["certified"], changed))
    fin = sorted(z for z in g["z"] if z != float("inf"))
    zmed = f"{fin[len(fin) // 2]:.3g}" if fin else "none finite"
    print(f"greedy certificate (docs/design.md §2.6): {k} of {n} generated tokens certified the same greedy token "
          f"as the full-precision cache ({k / max(1, n):.1%}); logit-oscillation bound median {zmed}, "
          f"{sum(z == float('inf') for z in g['z'])} outside the remainder's radius; margin median "
          f"{sorted(g['margin'])[n // 2]:.3g}", file=err)
    print(f"checked against the full-precision model on the same tokens: {sum(changed)} of {n} greedy tokens "
          f"differ, {bad} of them certified" + (" - A CERTIFIED CLAIM DOES NOT STAND" if bad else ""), file=err)


def cmd_generate(args, out: TextIO, err: TextIO) -> int:
    from ..core.plan import load_plan

    plan = load_plan(args.plan)
    if args.max_new_tokens <= 0:
        raise InvalidArgument(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    set_threads(args.threads)
    quiet_transformers()
    import torch

    from ..kv.cache import MixedPrecisionCache
    from ..models import load_model

    lm = load_model(args.model, verbose=False)
    cache = MixedPrecisionCache.from_plan(plan, lm.model, on_overflow=args.on_overflow)  # weights, config, shape, tau
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None) and not args.raw:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = args.prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(args.seed)
    import contextlib

    from ..kv.certify import certify

    t0 = time.perf_counter()
    with torch.no_grad(), (certify(lm.model, cache, keep_queries=True) if args.certify else
                           contextlib.nullcontext()) as cert:
        res = lm.model.generate(**enc, cache=cache, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                pad_token_id=tok.eos_token_id, return_dict_in_generate=True, output_logits=True)
    dt = time.perf_counter() - t0
    seq = res.sequences
    new = seq[0, enc["input_ids"].shape[1]:]
    out.write(tok.decode(new, skip_special_tokens=True).strip() + "\n")
    n_pos = cache.get_seq_length()
    print(f"[{len(new)} tokens in {dt:.1f} s; cache {cache.nbytes() / 1024:.1f} KiB for {n_pos} positions = "
          f"{cache.nbytes() * 8 / max(1, 2 * plan['shape']['layers'] * plan['shape']['kv_heads'] * n_pos * plan['shape']['head_dim']):.2f} "
          f"bits per element; plan avg {float(Fraction(plan['claims']['avg_bits'])):.2f} at {plan['max_seq_len']}]",
          file=err)
    if cert is not None:
        print_certificate(cert, plan, err)
        print_greedy_certificate(lm.model, cert, plan, seq, enc["input_ids"].shape[1], list(res.logits), err)
    if not cache.certified:
        print(f"UNCERTIFIED: the sequence grew to {n_pos} positions, past the plan's max_seq_len "
              f"{plan['max_seq_len']}; the plan's bounds do not cover this output", file=err)
    return EXIT_OK
