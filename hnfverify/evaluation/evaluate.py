"""Quality and soundness of methods on held-out text against the full-precision pass (``hnfverify eval``)."""

from __future__ import annotations

import math
import time

from ..errors import InvalidArgument
from .attention import WindowStats
from .plan_method import plan_method


class Accumulator:
    def __init__(self):
        self.nll_q, self.klds, self.top1, self.ratios, self.rt_ratios = [], [], [], [], []
        self.viol = self.checked = self.e2e_viol = self.rt_viol = self.rt_checked = 0
        self.worst_rel = 0.0
        self.e2e_ratio: list = []
        self.cache_bytes = None
        self.bytes_curve: list = []
        self.accounting_dev = None
        self.seconds = 0.0
        self.head_max: dict = {}
        self.output = None            # OutputAcc for plans with claims about the output (§2.6)


def evaluate_methods(lm, methods: list, corpus: str, windows: int = 8, prefix: int = 512, scored: int = 512,
                     progress: bool = False) -> dict:
    """Evaluate several methods on the same windows with one reference pass per window:
    {method name: result dict} (see :func:`evaluate` for the fields)."""
    import numpy as np
    import torch

    from ..texts import token_windows

    t_len = prefix + scored
    wins = token_windows(lm.tokenizer, corpus, split="eval", max_tokens=windows * t_len, window=t_len)
    if len(wins.windows) < windows or wins.window != t_len:
        raise InvalidArgument(f"the {corpus!r} {'evaluation split' if wins.split == 'eval' else 'text'} has only "
                              f"{wins.n_tokens} tokens "
                              f"({len(wins.windows)} windows of {t_len})")
    acc = {m.name: Accumulator() for m in methods}
    # the cache's real bytes at 8 lengths through the scored part: memory while decoding, not only at the end
    curve_lengths = sorted({prefix + (scored * k) // 8 for k in range(1, 9)})
    nll_ref = []
    it = wins.windows
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"eval {corpus}", unit="win", leave=False)
    for w in it:
        ids = torch.tensor([w])
        tgt = ids[0, prefix:t_len]
        with torch.no_grad():
            ref = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        zr = ref.logits[0, prefix - 1:t_len - 1].double()
        lr = torch.log_softmax(zr, -1)
        h_ref = ref.hidden_states[-1][0].double()
        del ref
        nll_ref.append(-lr.gather(1, tgt[:, None])[:, 0])
        for m in methods:
            a = acc[m.name]
            window_stats = WindowStats()
            t0 = time.perf_counter()
            with torch.no_grad(), m.context(lm.model, prefix, window_stats):
                q = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            a.seconds += time.perf_counter() - t0
            zq = q.logits[0, prefix - 1:t_len - 1].double()
            lq = torch.log_softmax(zq, -1)
            a.nll_q.append(-lq.gather(1, tgt[:, None])[:, 0])
            a.klds.append((lr.exp() * (lr - lq)).sum(-1))
            a.top1.append((lr.argmax(-1) == lq.argmax(-1)).double())
            a.viol += window_stats.violations
            a.checked += window_stats.checked
            a.worst_rel = max(a.worst_rel, window_stats.max_err_over_bound)
            a.ratios += window_stats.ratios
            a.rt_ratios += window_stats.rt_ratios
            a.rt_viol += window_stats.rt_violations
            a.rt_checked += window_stats.rt_checked
            for k, v in window_stats.head_max.items():
                a.head_max[k] = max(a.head_max.get(k, 0.0), v)
            h_err = float((q.hidden_states[-1][0].double() - h_ref).norm())
            if m.output is not None:
                from .output import OutputAcc, add_window

                a.output = a.output or OutputAcc()
                add_window(a.output, m.output, lr, lq, zr, zq, window_stats, prefix, t_len, h_err)
            if m.e_l is not None:
                if h_err > m.e_l:
                    a.e2e_viol += 1
                if h_err > 0:
                    a.e2e_ratio.append(m.e_l / h_err)
            if a.cache_bytes is None:
                a.cache_bytes = m.nbytes(window_stats, t_len)
                acc_fn = m.accounted or m.nbytes
                a.bytes_curve = [(n, acc_fn(window_stats, n)) for n in range(prefix + 1, t_len + 1)]
                if m.accounted is not None:          # the accounting against real packed bytes at 8 lengths
                    curve = dict(a.bytes_curve)
                    a.accounting_dev = max(abs(curve[n] / m.nbytes(window_stats, n) - 1) for n in curve_lengths)
            del q
    nr = torch.cat(nll_ref)
    cfg = lm.model.config
    n_l = cfg.num_hidden_layers
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elements = 2 * n_l * n_kv * t_len * hd
    out = {}
    for m in methods:
        a = acc[m.name]
        nq = torch.cat(a.nll_q)
        rat = torch.cat(a.ratios).numpy() if a.ratios else np.array([])
        rt = torch.cat(a.rt_ratios).numpy() if a.rt_ratios else np.array([])
        bpe = a.cache_bytes * 8 / elements
        per_len = [b * 8 / (2 * n_l * n_kv * n * hd) for n, b in a.bytes_curve]
        hist = {}
        if rat.size:
            edges = [0, 1, 2, 3, 4, 6, 10, 1e9]
            for lo, hi in zip(edges[:-1], edges[1:]):
                hist[f"1e{lo}-1e{hi if hi < 1e9 else 'inf'}"] = int(((rat >= lo) & (rat < hi)).sum())
            hist["<1 (violations)"] = int((rat < 0).sum())
        out[m.name] = {
            "method": m.name, "corpus": corpus, "split": "eval", "token_ids_sha256": wins.sha256(),
            "windows": len(wins.windows), "prefix": prefix, "tokens_scored": int(nq.numel()),
            "ppl_ref": math.exp(float(nr.mean())), "ppl": math.exp(float(nq.mean())),
            "kld": float(torch.cat(a.klds).mean()), "top1": float(torch.cat(a.top1).mean()),
            "cache_bytes": int(a.cache_bytes), "fp16_bytes": elements * 2, "bits_per_element": bpe,
            "compression": 16 / bpe,
            "bits_per_element_by_length": [[n, x] for (n, _), x in zip(a.bytes_curve, per_len)][::32],
            "accounting_vs_real_bytes_max_rel": a.accounting_dev,
            "bits_per_element_decode_mean": sum(per_len) / len(per_len),
            "bits_per_element_decode_max": max(per_len),
            "bound_violations": int(a.viol), "attention_outputs_checked": int(a.checked),
            "bound_over_actual_median": float(10 ** np.median(rat)) if rat.size else None,
            "bound_over_actual_min": float(10 ** rat.min()) if rat.size else None,
            "bound_over_actual_max": float(10 ** min(rat.max(), 300.0)) if rat.size else None,
            "bound_over_actual_p10": float(10 ** np.percentile(rat, 10)) if rat.size else None,
            "bound_over_actual_log10_histogram": hist,
            # the run-time bound of docs/design.md §2.4b (None when the plan records no error norms)
            "runtime_bound_violations": int(a.rt_viol) if a.rt_checked else None,
            "runtime_attention_outputs_checked": int(a.rt_checked),
            "runtime_bound_over_actual_median": float(10 ** np.median(rt)) if rt.size else None,
            "runtime_bound_over_actual_p10": float(10 ** np.percentile(rt, 10)) if rt.size else None,
            "runtime_bound_over_actual_min": float(10 ** rt.min()) if rt.size else None,
            "runtime_bound_over_actual_max": float(10 ** min(rt.max(), 300.0)) if rt.size else None,
            "end_to_end_violations": a.e2e_viol,
            "end_to_end_bound": m.e_l if m.e_l is not None and math.isfinite(m.e_l) else None,
            "end_to_end_form": "product" if m.output is None else "suffix",
            "end_to_end_bound_over_actual_median": (float(np.median(a.e2e_ratio)) if a.e2e_ratio and
                                                    math.isfinite(np.median(a.e2e_ratio)) else None),
            "output": None if a.output is None else __import__("hnfverify.evaluation.output", fromlist=["summarize"])
            .summarize(a.output, m.output),
            "seconds_per_scored_token": a.seconds / max(1, int(nq.numel())),
            "protocol": m.protocol,
            "per_head": [[k[0], k[1], m.bounds[k], v] for k, v in sorted(a.head_max.items())] if m.bounds else [],
        }
    return out


def evaluate(lm, plan: dict, corpus: str, windows: int = 8, prefix: int = 512, scored: int = 512,
             progress: bool = False) -> dict:
    from ..models import check_plan_matches_model

    check_plan_matches_model(plan, lm.model)            # weights, config, shape and tau: before any long work
    t_len = prefix + scored
    if plan["max_seq_len"] < t_len:
        raise InvalidArgument(f"the plan covers {plan['max_seq_len']} positions but the evaluation needs "
                              f"prefix + scored = {t_len}; analyze with --window >= {t_len}")
    r = evaluate_methods(lm, [plan_method("plan", plan)], corpus, windows, prefix, scored, progress)["plan"]
    del r["method"]
    return r
