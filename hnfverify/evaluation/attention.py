"""Evaluate a plan on real held-out text against the same model's full-precision cache.

Protocol (per window of prefix + scored tokens from the *evaluation* split): the reference is the
model's plain forward pass. The plan's run is a teacher-forced pass in which every scored query
i >= prefix attends to each earlier position t in exactly the form a plan cache holds it at that
moment, by the one definition of docs/design.md §4 (``hnfverify.core.semantics``; each scored query is
its own one-token chunk); its own K/V exact. Prefix queries attend exactly (prefill).
``tests/kv/test_kv_cache.py`` checks this pass against token-by-token decoding with
:class:`hnfverify.kv.cache.MixedPrecisionCache`.

Soundness: inside the same pass, every scored query's attention output with the plan's K/V is
compared with the exact attention output on the same q, K, V; the difference must not exceed the
certified bound E_h of its (layer, KV head) (docs/design.md §2.4, recomputed exactly from the
plan), nor — when the plan records error norms — the run-time bound of §2.4b, computed for that
query from the stored forms it reads and the norms a plan cache records for them (§4.1, the same
codes, chained the same way). The final hidden states' error over the window (Frobenius) is compared
with the composition bound e_L. Any excess is a violation: `hnfverify eval` then exits 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from fractions import Fraction

from ..analysis.routing import routed_attention
from ..errors import InvalidArgument


def plan_rules(plan: dict) -> dict:
    """(layer, KV head) -> (StreamRule of K, StreamRule of V), read through the typed plan view."""
    from ..core.planview import view

    out = {}
    for h in view(plan).heads():
        if h.keys.blocks or h.values.blocks:
            raise InvalidArgument("evaluation of plans with explicit per-position blocks is not supported")
        out[(h.layer, h.head)] = (h.keys.rule, h.values.rule)
    return out


def head_bounds(plan: dict) -> tuple[dict, float, list]:
    """(layer, head) -> certified attention-output bound E_h (float, rounded up); e_L; b_l — the same
    exact bounds ``hnfverify check`` decides (``bound.plan_bounds``)."""
    from ..core.bound import plan_bounds
    from ..core.planview import view

    pb = plan_bounds(view(plan))
    return ({k: float_up(e) for k, e in pb.head_errors.items()}, float_up(pb.end_to_end),
            [float_up(b) for b in pb.layer_bounds])


def float_up(x: Fraction) -> float:
    import numpy as np

    try:
        f = float(x)
    except OverflowError:
        return float("inf")
    if f == float("inf"):
        return f
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


def version_norms(x, vers, rule):
    """(4, T) float64: the error-norm bound a plan cache records for each stored form of ``versions``
    (docs/design.md §4.1): exact 0; sink and recent their own stage; rest chained from the recent code
    (from 0 with R = 0) by the triangle inequality — the codes ``hnfverify.kv.cache`` writes."""
    import torch

    from ..kv import norms

    zero = torch.zeros(x.shape[0], dtype=torch.uint8)
    sink = norms.encode_up(norms.error_norm(vers[1], x))
    rec = norms.encode_up(norms.error_norm(vers[2], x)) if rule.recent > 0 else zero
    rest = norms.chained(rec, norms.error_norm(vers[3], vers[2])) if rule.recent > 0 else \
        norms.encode_up(norms.error_norm(vers[3], x))
    return norms.decode(torch.stack([zero, sink, rec, rest]))


def selector(rule, t_len: int, prefix: int):
    """(T, T) int8 codes of what query i (row) reads at position t when the cache holds the prefix and
    then one token per step (each scored query is its own chunk), per ``semantics.read_intervals``."""
    import torch

    from ..core.semantics import State, layout, read_intervals

    code = {State.SINK: SINK, State.RECENT: RECENT, State.REST: REST,
            State.RECENT_FAR: RECENT if rule.recent > 0 else EXACT, None: EXACT}
    sel = torch.zeros((t_len, t_len), dtype=torch.int8)
    for i in range(prefix, t_len):
        for lo, hi, state in read_intervals(rule, layout(rule, i), i):
            sel[i, lo:hi] = code[state]
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
    rt_ratios: list = field(default_factory=list)      # log10(run-time bound / actual), max over query heads
    rt_violations: int = 0
    rt_checked: int = 0
    # per layer, per scored position: the run-time bound of the error injected into the hidden state (the
    # o_proj output), sum_h ||W_o[:, group h]|| sqrt(sum_{j in h} bound_j^2), and the actual ||e_l(t)||^2
    inj_rt: dict = field(default_factory=dict)
    inj_act: dict = field(default_factory=dict)


def cached_selector(cache: dict, rule, t_len: int, prefix: int):
    key = (t_len, prefix, rule.sink, rule.recent, rule.channel_group)
    if key not in cache:
        cache[key] = selector(rule, t_len, prefix)
    return cache[key]


@contextlib.contextmanager
def plan_attention(model, plan: dict, prefix: int, bounds: dict, stats: WindowStats):
    """Route the model's attention through the plan's teacher-forced attention inside the block."""
    import torch

    from ..kv.certify import bound_from_parts, distances_up

    rules = plan_rules(plan)
    from ..core.planview import view as _view

    onorm = [[float_up(h.o_proj_norm) for h in la.heads] for la in _view(plan).layers]
    sel_cache: dict = {}
    runtime = plan["rule"].get("error_norms") == "u8log"
    output = plan["composition"]["form"] == "suffix"        # the injected errors feed the output claims (§2.6)

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
        n_sc = max(t_len - prefix, 0)
        delta = torch.zeros(b, n_sc if output else 0, hq, d, dtype=torch.float64)  # o~ - o per scored query
        rt_all = torch.zeros(b, hq, n_sc, dtype=torch.float64)              # run-time bound per query head
        for bi in range(b):
            for h in range(hkv):
                krule, vrule = rules[(li, h)]
                kx, vx = key[bi, h].float(), value[bi, h].float()
                selk, selv = (cached_selector(sel_cache, r_, t_len, prefix) for r_ in (krule, vrule))
                kvers, vvers = versions(kx, krule), versions(vx, vrule)
                bound = bounds[(li, h)]
                worst = torch.zeros(max(t_len - prefix, 0), dtype=torch.float64)
                rt_worst, rt_err = torch.zeros_like(worst), torch.zeros_like(worst)
                if runtime and t_len > prefix:
                    ar = torch.arange(t_len)
                    dk_m = version_norms(kx, kvers, krule)[selk[prefix:].long(), ar]      # (n, T)
                    dv_m = version_norms(vx, vvers, vrule)[selv[prefix:].long(), ar]
                    k64, v64 = [kv_.double() for kv_ in kvers], [vv.double() for vv in vvers]
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
                        if output:
                            delta[bi, :, h * g + gi] = o[prefix:].double() - oe
                        err = (o[prefix:].double() - oe).norm(dim=-1)
                        worst = torch.maximum(worst, err)
                        if runtime:
                            # §2.4b from the stored forms query i reads and their recorded norms, in float64
                            mb64 = mb[prefix:].double()
                            s64 = torch.zeros_like(se)
                            for vi, kv_ in enumerate(k64):
                                s64 = torch.where(selk[prefix:] == vi, tau * (qs @ kv_.T), s64)
                            a64 = torch.softmax(s64 + mb64, dim=-1)
                            o64 = sum(torch.where(selv[prefix:] == vi, a64, torch.zeros((), dtype=torch.float64)) @ vv
                                      for vi, vv in enumerate(v64))
                            dist = torch.zeros_like(a64)
                            for vi, vv in enumerate(v64):
                                dist = torch.where(selv[prefix:] == vi, distances_up(vv, o64), dist)
                            vis = mb64 > torch.finfo(torch.float32).min / 2
                            rb = bound_from_parts(a64, dist, dk_m, dv_m, qs.norm(dim=-1), tau, vis)
                            # the bound is of exact arithmetic: compare the float64 attention over the stored
                            # forms, allowing float64 rounding (1e-12 of the values' scale)
                            err64 = (o64 - oe).norm(dim=-1)
                            slack = 1e-12 * (1.0 + float(vx.norm(dim=-1).max()))
                            stats.rt_violations += int((err64 > rb + slack).sum())
                            rt_worst = torch.maximum(rt_worst, rb)
                            rt_all[bi, h * g + gi] = rb
                            rt_err = torch.maximum(rt_err, err64)
                if t_len > prefix:
                    stats.head_max[(li, h)] = max(stats.head_max.get((li, h), 0.0), float(worst.max()))
                    stats.checked += worst.numel()
                    stats.violations += int((worst > bound).sum())
                    stats.max_err_over_bound = max(stats.max_err_over_bound, float((worst / bound).max()))
                    nz = worst[worst > 0]
                    if nz.numel():
                        stats.ratios.append((bound / nz).log10())
                    if runtime:
                        stats.rt_checked += worst.numel()
                        pos = rt_err > 1e-12
                        if pos.any():
                            stats.rt_ratios.append((rt_worst[pos] / rt_err[pos]).log10())
        if n_sc and output:
            from ..analysis.instrument import output_projection

            w_o = output_projection(module).weight.detach().double()          # (D, Hq d)
            e = delta.reshape(b, n_sc, hq * d) @ w_o.T
            stats.inj_act[li] = (e * e).sum(-1).amax(0)                      # (n,) per scored position
            if runtime:
                from ..kv.certify import injected_bounds

                stats.inj_rt[li] = injected_bounds(rt_all, onorm[li]).amax(0)
        return out, None

    with routed_attention(model, attn, prefix="hnfverify_plan"):
        yield
