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
    """(selector, spans) of ``rule``: the selector, and per code the scored rows read, the smallest column
    range [lo, hi) holding it with the rows' mask there: [(code, lo, hi, (n, hi - lo) bool)]."""
    key = (t_len, prefix, rule.sink, rule.recent, rule.channel_group)
    if key not in cache:
        sel = selector(rule, t_len, prefix)
        cache[key] = (sel, _spans(sel[prefix:]))
    return cache[key]


def _sel(cache: dict, rule, t_len: int, prefix: int):
    """The scored rows of ``rule``'s selector as int64 indices (n, T), cached with it."""
    key = ("long", t_len, prefix, rule.sink, rule.recent, rule.channel_group)
    if key not in cache:
        cache[key] = cached_selector(cache, rule, t_len, prefix)[0][prefix:].long()
    return cache[key]


def _spans(sel) -> list:
    out = []
    for code in (EXACT, SINK, RECENT, REST):
        m = sel == code
        cols = m.any(0).nonzero()
        if cols.numel():
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            out.append((code, lo, hi, m[:, lo:hi]))
    return out


def plan_parts(plan: dict) -> tuple:
    """What the teacher-forced attention reads of a plan, once per plan: its rules (``plan_rules``) and each
    (layer, KV head)'s ||W_o|| block norm rounded up."""
    from ..core.planview import view

    return plan_rules(plan), [[float_up(h.o_proj_norm) for h in la.heads] for la in view(plan).layers]


@contextlib.contextmanager
def plan_attention(model, plan: dict, prefix: int, bounds: dict, stats: WindowStats, parts: tuple | None = None):
    """Route the model's attention through the plan's teacher-forced attention inside the block.
    ``parts``: ``plan_parts(plan)`` when the caller has it (evaluating many windows)."""
    import torch

    from ..kv.certify import bound_from_parts, distances_up

    rules, onorm = parts if parts is not None else plan_parts(plan)
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
        zero32, zero64 = torch.zeros(()), torch.zeros((), dtype=torch.float64)
        for bi in range(b):
            for h in range(hkv):
                krule, vrule = rules[(li, h)]
                kx, vx = key[bi, h].float(), value[bi, h].float()
                (_, spk), (_, spv) = (cached_selector(sel_cache, r_, t_len, prefix) for r_ in (krule, vrule))
                kvers, vvers = versions(kx, krule), versions(vx, vrule)
                bound = bounds[(li, h)]
                hs = slice(h * g, (h + 1) * g)                               # the KV head's query heads
                qg = query[bi, hs].float()                                   # (g, T, d)
                mb = bias[bi if bias.shape[0] > 1 else 0, hs if bias.shape[1] > 1 else slice(0, 1)]  # (g|1, T, T)
                # prefix queries read exactly (prefill); scored query i reads at t the stored form its selector
                # names, computed on the columns where that form is read
                sc = tau * (qg @ kx.T)
                for code, lo, hi, msk in spk:
                    if code != EXACT:
                        sc[:, prefix:, lo:hi] = torch.where(msk, tau * (qg[:, prefix:] @ kvers[code][lo:hi].T),
                                                            sc[:, prefix:, lo:hi])
                a = torch.softmax(sc + mb, dim=-1)
                o = a @ vx                                                   # (g, T, d)
                if n_sc:
                    o_s = torch.zeros(g, n_sc, d)
                    for code, lo, hi, msk in spv:
                        o_s = o_s + torch.where(msk, a[:, prefix:, lo:hi], zero32) @ vvers[code][lo:hi]
                    o[:, prefix:] = o_s
                out[bi, :, hs] = o.transpose(0, 1).to(out.dtype)
                if not n_sc:
                    continue
                # soundness: the exact attention output on the same q, K, V
                qs = qg[:, prefix:].double()
                mbs = mb[:, prefix:].double()
                oe = torch.softmax(tau * (qs @ kx.double().T) + mbs, dim=-1) @ vx.double()
                diff = o_s.double() - oe                                     # (g, n, d)
                if output:
                    delta[bi, :, hs] = diff.transpose(0, 1)
                worst = diff.norm(dim=-1).amax(0)                            # max over the query heads
                if runtime:
                    # §2.4b from the stored forms query i reads and their recorded norms, in float64
                    ar = torch.arange(t_len)
                    dk_m = version_norms(kx, kvers, krule)[_sel(sel_cache, krule, t_len, prefix), ar]   # (n, T)
                    dv_m = version_norms(vx, vvers, vrule)[_sel(sel_cache, vrule, t_len, prefix), ar]
                    s64 = torch.zeros(g, n_sc, t_len, dtype=torch.float64)
                    for code, lo, hi, msk in spk:
                        s64[..., lo:hi] = torch.where(msk, tau * (qs @ kvers[code][lo:hi].double().T), s64[..., lo:hi])
                    a64 = torch.softmax(s64 + mbs, dim=-1)
                    v64 = [(code, lo, hi, msk, vvers[code][lo:hi].double()) for code, lo, hi, msk in spv]
                    o64 = torch.zeros(g, n_sc, d, dtype=torch.float64)
                    for code, lo, hi, msk, vv in v64:
                        o64 = o64 + torch.where(msk, a64[..., lo:hi], zero64) @ vv
                    dist = torch.zeros_like(a64)
                    for code, lo, hi, msk, vv in v64:
                        dist[..., lo:hi] = torch.where(msk, distances_up(vv, o64), dist[..., lo:hi])
                    vis = mbs > torch.finfo(torch.float32).min / 2
                    rb = bound_from_parts(a64, dist, dk_m, dv_m, qs.norm(dim=-1), tau, vis)      # (g, n)
                    # the bound is of exact arithmetic: compare the float64 attention over the stored
                    # forms, allowing float64 rounding (1e-12 of the values' scale)
                    err64 = (o64 - oe).norm(dim=-1)
                    slack = 1e-12 * (1.0 + float(vx.norm(dim=-1).max()))
                    stats.rt_violations += int((err64 > rb + slack).sum())
                    rt_all[bi, hs] = rb
                    rt_worst, rt_err = rb.amax(0), err64.amax(0)
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
