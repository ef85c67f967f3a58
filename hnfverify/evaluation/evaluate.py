"""Evaluate a plan on real held-out text against the same model's full-precision cache.

Protocol (per window of prefix + scored tokens from the *evaluation* split): the reference is the
model's plain forward pass. The plan's run is a teacher-forced pass in which every scored query
i >= prefix attends to each earlier position t in exactly the form a plan cache holds it at that
moment, by the one definition of docs/design.md §4 (``hnfverify.core.semantics``; each scored query is
its own one-token chunk); its own K/V exact. Prefix queries attend exactly (prefill).
``tests/test_kv_cache.py`` checks this pass against token-by-token decoding with
:class:`hnfverify.kv.cache.MixedPrecisionCache`.

Soundness: inside the same pass, every scored query's attention output with the plan's K/V is
compared with the exact attention output on the same q, K, V; the difference must not exceed the
certified bound E_h of its (layer, KV head) (docs/design.md §2.4, recomputed exactly from the
plan). The final hidden states' error over the window (Frobenius) is compared with the
composition bound e_L. Any excess is a violation: `hnfverify eval` then exits 1.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction

from ..errors import InvalidArgument

_counter = itertools.count()


def plan_rules(plan: dict) -> dict:
    """(layer, KV head) -> (StreamRule of K, StreamRule of V), read through the typed plan view."""
    from ..core.planview import view

    out = {}
    for h in view(plan).heads():
        if h.k.blocks or h.v.blocks:
            raise InvalidArgument("evaluation of plans with explicit per-position blocks is not supported")
        out[(h.layer, h.head)] = (h.k.rule, h.v.rule)
    return out


def head_bounds(plan: dict) -> tuple[dict, float, list]:
    """(layer, head) -> certified attention-output bound E_h (float, rounded up); e_L; b_l — the same
    exact bounds ``hnfverify check`` decides (``bound.plan_bounds``)."""
    from ..core.bound import plan_bounds
    from ..core.planview import view

    pb = plan_bounds(view(plan))
    return ({k: _float_up(e) for k, e in pb.head_errors.items()}, _float_up(pb.end_to_end),
            [_float_up(b) for b in pb.layer_bounds])


def _float_up(x: Fraction) -> float:
    import numpy as np

    try:
        f = float(x)
    except OverflowError:
        return float("inf")
    return f if Fraction(f) >= x else float(np.nextafter(f, np.inf))


# ---------------------------------------------------------------------------- the plan's view of K and V
EXACT, SINK, RECENT, REST = 0, 1, 2, 3          # codes of what a query reads (selector entries)


def versions(x, rule) -> tuple:
    """x: (T, d) exact values of one stream. Returns (exact, sink, recent, rest): each stored form's
    value at every position (docs/design.md §4; rows where a form cannot occur hold anything)."""
    from ..kv.quant import dequantize, quantize, roundtrip
    from ..core.semantics import channel_groups

    t = x.shape[0]
    s = min(rule.sink, t)
    f = rule.formats
    sink = x.clone()
    if s:
        sink[:s] = roundtrip(x[:s], f["sink"])
    rec = x.clone()
    if rule.recent > 0 and t > s:
        rec[s:] = roundtrip(x[s:], f["recent"])
    rest = rec.clone()
    if t > s:
        if rule.channel_group is None:
            rest[s:] = roundtrip(rec[s:], f["rest"])
        else:
            lo = s
            for m in channel_groups(rule, s, t):
                rest[lo:lo + m] = dequantize(quantize(rec[lo:lo + m], f["rest"], group_tokens=m))
                lo += m
    return x, sink, rec, rest


def selector(rule, t_len: int, prefix: int):
    """(T, T) int8 codes of what query i (row) reads at position t when the cache holds the prefix and
    then one token per step (each scored query is its own chunk), per ``semantics.read_intervals``."""
    import torch

    from ..core.semantics import State, layout, read_intervals

    code = {State.SINK: SINK, State.RECENT: RECENT, State.REST: REST,
            State.RECENT_FAR: RECENT if rule.recent > 0 else EXACT, None: EXACT}
    sel = torch.zeros((t_len, t_len), dtype=torch.int8)
    for i in range(prefix, t_len):
        for lo, hi, st in read_intervals(rule, layout(rule, i), i):
            sel[i, lo:hi] = code[st]
    return sel


@dataclass
class WindowStats:
    attn_err: list = field(default_factory=list)       # (layer, head, max over query heads of ||o~ - o||) per query
    ratios: list = field(default_factory=list)
    violations: int = 0
    checked: int = 0
    max_err_over_bound: float = 0.0
    kv: dict = field(default_factory=dict)             # layer -> (k, v) exact of this pass, for real bytes
    head_max: dict = field(default_factory=dict)       # (layer, head) -> largest ||o~ - o|| over scored queries


def _cached_selector(cache: dict, rule, t_len: int, prefix: int):
    key = (t_len, prefix, rule.sink, rule.recent, rule.channel_group)
    if key not in cache:
        cache[key] = selector(rule, t_len, prefix)
    return cache[key]


@contextlib.contextmanager
def plan_attention(model, plan: dict, prefix: int, bounds: dict, stats: WindowStats):
    """Route the model's attention through the plan's teacher-forced attention inside the block."""
    import torch

    rules = plan_rules(plan)
    sel_cache: dict = {}

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from ..analysis.analyzer import attention_bias, refuse_unimplemented_attention

        # the model's own attention: its mask (causal, sliding window, padding) and scaling; anything else refused
        refuse_unimplemented_attention(module, dropout, kwargs, "the plan's teacher-forced attention")
        b, hq, t_len, d = query.shape
        hkv = key.shape[1]
        g = hq // hkv
        tau = float(scaling if scaling is not None else getattr(module, "scaling", d ** -0.5))
        li = int(module.layer_idx)
        out = torch.empty(b, t_len, hq, d, dtype=query.dtype)
        bias = attention_bias(attention_mask, query, key, module)          # (B|1, Hq|1, T, T) float32
        stats.kv[li] = (key.detach(), value.detach())
        for bi in range(b):
            for h in range(hkv):
                krule, vrule = rules[(li, h)]
                kx, vx = key[bi, h].float(), value[bi, h].float()
                selk, selv = (_cached_selector(sel_cache, r_, t_len, prefix) for r_ in (krule, vrule))
                kvers, vvers = versions(kx, krule), versions(vx, vrule)
                bound = bounds[(li, h)]
                worst = torch.zeros(max(t_len - prefix, 0), dtype=torch.float64)
                for gi in range(g):
                    qh = query[bi, h * g + gi].float()                      # (T, d)
                    mb = bias[bi if bias.shape[0] > 1 else 0, h * g + gi if bias.shape[1] > 1 else 0]
                    sc = torch.zeros(t_len, t_len)
                    for vi, kv_ in enumerate(kvers):
                        sc = torch.where(selk == vi, tau * (qh @ kv_.T), sc)
                    sc = sc + mb
                    a = torch.softmax(sc, dim=-1)
                    o = torch.zeros(t_len, d)
                    for vi, vv in enumerate(vvers):
                        o = o + torch.where(selv == vi, a, torch.zeros(())) @ vv
                    out[bi, :, h * g + gi] = o.to(out.dtype)
                    if t_len > prefix:
                        # soundness: the exact attention output on the same q, K, V
                        qs = qh[prefix:].double()
                        se = tau * (qs @ kx.double().T) + mb[prefix:].double()
                        oe = torch.softmax(se, dim=-1) @ vx.double()
                        err = (o[prefix:].double() - oe).norm(dim=-1)
                        worst = torch.maximum(worst, err)
                if t_len > prefix:
                    stats.head_max[(li, h)] = max(stats.head_max.get((li, h), 0.0), float(worst.max()))
                    stats.checked += worst.numel()
                    stats.violations += int((worst > bound).sum())
                    stats.max_err_over_bound = max(stats.max_err_over_bound, float((worst / bound).max()))
                    nz = worst[worst > 0]
                    if nz.numel():
                        stats.ratios.append((bound / nz).log10())
        return out, None

    with route_attention(model, attn, "hnfverify_plan"):
        yield


@contextlib.contextmanager
def route_attention(model, attn, prefix: str):
    """Register ``attn`` under a unique name (with the eager mask) and route ``model`` through it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{prefix}_{next(_counter)}"
    orig = model.config._attn_implementation or "eager"
    AttentionInterface.register(name, attn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = orig
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def real_cache_bytes(plan: dict, kv: dict, t_len: int) -> int:
    """Bytes of the packed cache holding the window's K/V at length t_len, as a plan cache stores them
    after one-token steps (``semantics.stored_counts``), quantized for real: values, scales,
    zero-points, FP32 pending positions."""
    from ..kv.quant import quantize
    from ..core.semantics import stored_counts

    rules = plan_rules(plan)
    total = 0
    for li, (k, v) in kv.items():
        for h in range(k.shape[1]):
            for x, rule in zip((k[0, h].float(), v[0, h].float()), rules[(li, h)]):
                c = stored_counts(rule, t_len)
                f = rule.formats
                s, n_rest = c["sink"], c["rest"]
                if s:
                    total += quantize(x[:s], f["sink"]).nbytes
                if rule.channel_group is None:
                    if n_rest:
                        total += quantize(x[s:s + n_rest], f["rest"]).nbytes
                else:
                    lo = s
                    for m in c["rest_groups"]:
                        total += quantize(x[lo:lo + m], f["rest"], group_tokens=m).nbytes
                        lo += m
                total += c["pending"] * x.shape[1] * 4
                if c["recent"]:
                    total += quantize(x[t_len - c["recent"]:t_len], f["recent"]).nbytes
    return total


@dataclass
class Method:
    """One way of holding the past K/V in a teacher-forced pass. ``context(model, prefix, stats)``
    routes attention; ``nbytes(stats, t_len)`` counts the real bytes of the packed cache at t_len;
    ``bounds`` (per (layer, head)) and ``e_l`` are the certified bounds, or None for peers."""
    name: str
    context: object
    nbytes: object
    bounds: dict | None = None
    e_l: float | None = None
    protocol: str = "teacher-forced pass equal to plan-cache decoding (see hnfverify.evaluation.evaluate)"
    accounted: object = None      # (stats, n) -> bytes by the formats' accounting (cheap; at every length)


def plan_method(name: str, plan: dict) -> Method:
    bounds, e_l, _ = head_bounds(plan)
    units = _accounting_units(plan)

    def nbytes(st, t_len):
        return real_cache_bytes(plan, {li: (k[:, :, :t_len], v[:, :, :t_len]) for li, (k, v) in st.kv.items()}, t_len)

    return Method(name, lambda model, prefix, st: plan_attention(model, plan, prefix, bounds, st), nbytes,
                  bounds, e_l, accounted=lambda st, n: accounted_bytes(units, plan["shape"]["head_dim"], n))


def _accounting_units(plan: dict) -> list:
    """The StreamRule of every (layer, KV head, K|V) of a rule plan."""
    return [r for rules in plan_rules(plan).values() for r in rules]


def accounted_bytes(units: list, d: int, n: int) -> int:
    """Bytes of a plan cache holding n positions by the accounting of docs/design.md §4 (the planner's
    claims use the same; the cache's real packed bytes agree, tests/test_cache_semantics.py)."""
    from ..core.semantics import SEGMENTS, segment_bits, stored_counts

    bits = 0
    for rule in units:
        c = stored_counts(rule, n)
        bits += sum(segment_bits(rule.formats[seg], seg, c, d) for seg in SEGMENTS)
    return int(bits) // 8


class _Acc:
    def __init__(self):
        self.nll_q, self.klds, self.top1, self.ratios = [], [], [], []
        self.viol = self.checked = self.e2e_viol = 0
        self.worst_rel = 0.0
        self.e2e_ratio: list = []
        self.cache_bytes = None
        self.bytes_curve: list = []
        self.accounting_dev = None
        self.seconds = 0.0
        self.head_max: dict = {}


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
        raise InvalidArgument(f"the {corpus!r} evaluation split has only {wins.n_tokens} tokens "
                              f"({len(wins.windows)} windows of {t_len})")
    acc = {m.name: _Acc() for m in methods}
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
        lr = torch.log_softmax(ref.logits[0, prefix - 1:t_len - 1].double(), -1)
        h_ref = ref.hidden_states[-1][0].double()
        del ref
        nll_ref.append(-lr.gather(1, tgt[:, None])[:, 0])
        for m in methods:
            a = acc[m.name]
            st = WindowStats()
            t0 = time.perf_counter()
            with torch.no_grad(), m.context(lm.model, prefix, st):
                q = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            a.seconds += time.perf_counter() - t0
            lq = torch.log_softmax(q.logits[0, prefix - 1:t_len - 1].double(), -1)
            a.nll_q.append(-lq.gather(1, tgt[:, None])[:, 0])
            a.klds.append((lr.exp() * (lr - lq)).sum(-1))
            a.top1.append((lr.argmax(-1) == lq.argmax(-1)).double())
            a.viol += st.violations
            a.checked += st.checked
            a.worst_rel = max(a.worst_rel, st.max_err_over_bound)
            a.ratios += st.ratios
            for k, v in st.head_max.items():
                a.head_max[k] = max(a.head_max.get(k, 0.0), v)
            if m.e_l is not None:
                h_err = float((q.hidden_states[-1][0].double() - h_ref).norm())
                if h_err > m.e_l:
                    a.e2e_viol += 1
                if h_err > 0:
                    a.e2e_ratio.append(m.e_l / h_err)
            if a.cache_bytes is None:
                a.cache_bytes = m.nbytes(st, t_len)
                acc_fn = m.accounted or m.nbytes
                a.bytes_curve = [(n, acc_fn(st, n)) for n in range(prefix + 1, t_len + 1)]
                if m.accounted is not None:          # the accounting against real packed bytes at 8 lengths
                    curve = dict(a.bytes_curve)
                    a.accounting_dev = max(abs(curve[n] / m.nbytes(st, n) - 1) for n in curve_lengths)
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
            "bound_over_actual_log10_histogram": hist,
            "end_to_end_violations": a.e2e_viol, "end_to_end_bound": m.e_l,
            "end_to_end_bound_over_actual_median": float(np.median(a.e2e_ratio)) if a.e2e_ratio else None,
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
