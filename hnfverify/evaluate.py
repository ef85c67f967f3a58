"""Evaluate a plan on real held-out text against the same model's full-precision cache.

Protocol (per window of prefix + scored tokens from the *evaluation* split): the reference is the
model's plain forward pass. The plan's run is a teacher-forced pass in which every scored query
i >= prefix attends to each earlier position t in exactly the form a plan cache would hold it at
that moment: t < S its sink format; i - t < R its recent format; otherwise its rest format,
re-quantized from the recent value when it left the window (a channel-grouped rest format only
once the whole group has left; until then the FP32 copy of the recent value); its own K/V exact.
Prefix queries attend exactly (prefill). ``tests/test_evaluate.py`` checks this pass against
token-by-token decoding with :class:`hnfverify.kv.cache.MixedPrecisionCache`.

Soundness: inside the same pass, every scored query's attention output with the plan's K/V is
compared with the exact attention output on the same q, K, V; the difference must not exceed the
certified first-order bound E_h of its (layer, KV head) (DESIGN 2.4, recomputed exactly from the
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

from .errors import InvalidArgument

_counter = itertools.count()


@dataclass
class HeadRule:
    s: int
    r: int
    k: dict        # segment -> Format
    v: dict


def plan_rules(plan: dict) -> dict:
    from .formats import by_name

    out = {}
    for layer in plan["layers"]:
        for head in layer["heads"]:
            for kv in ("K", "V"):
                if head[kv]["blocks"]:
                    raise InvalidArgument("evaluation of plans with explicit per-position blocks is not supported")
            out[(layer["layer"], head["kv_head"])] = HeadRule(
                head["K"]["sink"]["length"], head["K"]["recent"]["length"],
                {s: by_name(head["K"][s]["format"]) for s in ("sink", "recent", "rest")},
                {s: by_name(head["V"][s]["format"]) for s in ("sink", "recent", "rest")})
    return out


def head_bounds(plan: dict) -> tuple[dict, float, list]:
    """(layer, head) -> certified first-order attention-output bound E_h (float, rounded up); e_L; b_l."""
    from .bound import exact_end_to_end, exact_head_error, exact_layer_bound
    from .formats import by_name
    from .numbers import parse_number
    from .verify.obligations import _head_inputs

    d = plan["shape"]["head_dim"]
    g = plan["shape"]["query_heads"] // plan["shape"]["kv_heads"]
    out, layer_b, lips = {}, [], []
    for layer in plan["layers"]:
        tau = parse_number(layer["tau"])
        errs, norms = [], []
        for head in layer["heads"]:
            hi = _head_inputs(head, tau, d, plan["max_seq_len"])
            fk = {s: by_name(head["K"][s]["format"]) for s in hi.k}
            fv = {s: by_name(head["V"][s]["format"]) for s in hi.v}
            e = exact_head_error(hi, fk, fv)
            errs.append(e)
            norms.append(parse_number(head["o_proj_norm"]))
            out[(layer["layer"], head["kv_head"])] = _float_up(e)
        layer_b.append(exact_layer_bound(errs, norms, g))
        lips.append(parse_number(layer["lipschitz"]["value"]))
    e_l = exact_end_to_end(layer_b, lips, plan["max_seq_len"])
    return out, _float_up(e_l), [_float_up(b) for b in layer_b]


def _float_up(x: Fraction) -> float:
    import numpy as np

    try:
        f = float(x)
    except OverflowError:
        return float("inf")
    return f if Fraction(f) >= x else float(np.nextafter(f, np.inf))


# ---------------------------------------------------------------------------- the plan's view of K and V
def versions(x, rule_s: int, rule_r: int, fmts: dict):
    """x: (T, d) exact. Returns (sink, recent, rest) dequantized tensors (T, d) (rows where a version
    does not apply are left exact) and ``complete``: for channel-grouped rest formats, the last
    position of each row's group (to decide when the group has left the window), else None."""
    import torch

    from .kv.quant import roundtrip

    t, _ = x.shape
    s = min(rule_s, t)
    sink = x.clone()
    if s:
        sink[:s] = roundtrip(x[:s], fmts["sink"])
    rec = x.clone()
    if t > s:
        rec[s:] = roundtrip(x[s:], fmts["recent"])
    rest = rec.clone()
    group_end = None
    f = fmts["rest"]
    if t > s:
        if f.granularity == "channel":
            g = f.group
            n_full = (t - s) // g * g
            if n_full:
                rest[s:s + n_full] = roundtrip(rec[s:s + n_full], f)
            idx = torch.arange(t)
            group_end = torch.where(idx >= s, s + ((idx - s) // g + 1) * g - 1, torch.zeros_like(idx))
            group_end = torch.where(idx >= s + n_full, torch.full_like(idx, 1 << 40), group_end)
        else:
            rest[s:] = roundtrip(rec[s:], f)
    return sink, rec, rest, group_end


def selector(t_len: int, prefix: int, s: int, r: int, group_end):
    """(T, T) int8: 0 exact, 1 sink, 2 recent (or pending), 3 rest — for query i (rows) and key t."""
    import torch

    i = torch.arange(t_len)[:, None]
    t = torch.arange(t_len)[None, :]
    sel = torch.full((t_len, t_len), 2, dtype=torch.int8)
    far = (i - t) >= r
    if group_end is not None:
        far = far & ((i - group_end[None, :]) >= r)
    sel = torch.where(far, torch.tensor(3, dtype=torch.int8), sel)
    sel = torch.where(t < s, torch.tensor(1, dtype=torch.int8), sel)
    sel = torch.where((t == i) | (i < prefix), torch.tensor(0, dtype=torch.int8), sel)
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


@contextlib.contextmanager
def plan_attention(model, plan: dict, prefix: int, bounds: dict, stats: WindowStats):
    """Route the model's attention through the plan's teacher-forced attention inside the block."""
    import torch

    rules = plan_rules(plan)
    sel_cache: dict = {}

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from .analyzer import attention_bias, refuse_unimplemented_attention

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
                rule = rules[(li, h)]
                kx, vx = key[bi, h].float(), value[bi, h].float()
                ks, kr, krest, kge = versions(kx, rule.s, rule.r, rule.k)
                vs, vr, vrest, vge = versions(vx, rule.s, rule.r, rule.v)
                skey = (t_len, rule.s, rule.r, None if kge is None else rule.k["rest"].group,
                        None if vge is None else rule.v["rest"].group)
                if skey not in sel_cache:
                    sel_cache[skey] = (selector(t_len, prefix, rule.s, rule.r, kge),
                                       selector(t_len, prefix, rule.s, rule.r, vge))
                selk, selv = sel_cache[skey]
                kvers, vvers = (kx, ks, kr, krest), (vx, vs, vr, vrest)
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
    """Bytes of the packed cache holding the window's K/V at its final length, as a plan cache stores
    them (scales and zero-points included; FP32 for incomplete channel groups)."""
    from .kv.quant import quantize

    rules = plan_rules(plan)
    total = 0
    for li, (k, v) in kv.items():
        for h in range(k.shape[1]):
            rule = rules[(li, h)]
            for x, fmts in ((k[0, h].float(), rule.k), (v[0, h].float(), rule.v)):
                s = min(rule.s, t_len)
                r = min(rule.r, max(0, t_len - s))
                segs = {"sink": x[:s], "recent": x[t_len - r:] if r else x[:0], "rest": x[s:t_len - r]}
                for seg, part in segs.items():
                    n = part.shape[0]
                    if n == 0:
                        continue
                    f = fmts[seg]
                    if f.granularity == "channel":
                        full = n - n % f.group
                        if full:
                            total += quantize(part[:full], f).nbytes
                        total += (n - full) * part.shape[1] * 4
                    else:
                        total += quantize(part, f).nbytes
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
    protocol: str = "teacher-forced pass equal to plan-cache decoding (see hnfverify.evaluate)"
    accounted: object = None      # (stats, n) -> bytes by the formats' accounting (cheap; at every length)


def plan_method(name: str, plan: dict) -> Method:
    bounds, e_l, _ = head_bounds(plan)
    units = _accounting_units(plan)

    def nbytes(st, t_len):
        return real_cache_bytes(plan, {li: (k[:, :, :t_len], v[:, :, :t_len]) for li, (k, v) in st.kv.items()}, t_len)

    return Method(name, lambda model, prefix, st: plan_attention(model, plan, prefix, bounds, st), nbytes,
                  bounds, e_l, accounted=lambda st, n: accounted_bytes(units, plan["shape"]["head_dim"], n))


def _accounting_units(plan: dict) -> list:
    """[(sink length, recent length, {segment: Format})] per (layer, KV head, K|V) of a rule plan."""
    from .formats import by_name

    return [(h[kv]["sink"]["length"], h[kv]["recent"]["length"],
             {seg: by_name(h[kv][seg]["format"]) for seg in ("sink", "recent", "rest")})
            for layer in plan["layers"] for h in layer["heads"] for kv in ("K", "V")]


def accounted_bytes(units: list, d: int, n: int) -> int:
    """Bytes of a plan cache holding n positions by the formats' accounting (the planner's; the cache's
    real packed bytes agree, tests/test_kv_cache.py): per unit the sink, recent and rest lengths at n
    (the planner's own split), each at its format's segment bits (an incomplete channel group as FP32)."""
    from .planner import _lengths

    bits = 0
    for s, r, fmts in units:
        for seg, length in _lengths(s, r, n).items():
            if length:
                bits += fmts[seg].segment_bits(length, d)
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

    from .texts import token_windows

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
    from .models import check_plan_matches_model

    check_plan_matches_model(plan, lm.model)            # weights, config, shape and tau: before any long work
    t_len = prefix + scored
    if plan["max_seq_len"] < t_len:
        raise InvalidArgument(f"the plan covers {plan['max_seq_len']} positions but the evaluation needs "
                              f"prefix + scored = {t_len}; analyze with --window >= {t_len}")
    r = evaluate_methods(lm, [plan_method("plan", plan)], corpus, windows, prefix, scored, progress)["plan"]
    del r["method"]
    return r
