"""Exact key curvature and first-order sensitivities of one attention head group (DESIGN 2.1, 2.4).

For a query q, scale tau, cached keys K_t and values V_t (keys after RoPE, as cached):

    s_t = tau * q.K_t,   alpha = softmax(s),   o = sum_t alpha_t V_t
    d o / d K_t           = tau * alpha_t (V_t - o) q^T                 (operator norm tau ||q|| alpha_t ||V_t - o||)
    D2_{K_t} o [u, u]     = tau^2 (q.u)^2 alpha_t (1 - 2 alpha_t) (V_t - o)
    kappa_t(q)            = 1/2 tau^2 ||q||^2 alpha_t |1 - 2 alpha_t| ||V_t - o||
    d o / d V_t           = alpha_t I,   curvature in V_t = 0 (o is linear in V_t)

(re-derived symbolically in ``proofs/curvature_sympy.py``). For each KV head h and cached position
t, the statistics are maxima over every query that attends to t: all query heads of h's GQA group
and every query position allowed by the mask (causal, sliding window).

Enclosures. Inputs are the captured float32 tensors, which are exact rationals. Everything is
evaluated in float64 and each reported maximum is widened to an interval [lo, hi] that contains
the exact real value of that maximum for those inputs:
relative margin DELTA = 2^-30 on every product, and absolute margins for the two cancellation-
prone factors: |1 - 2 alpha| +- ETA (ETA = 2^-30) and ||V_t - o||^2 +- ETA (||V_t|| + ||o||)^2.
Float64 evaluation of these expressions (dot products of length <= a few thousand, one exp per
score) errs by a few thousand units of 2^-53 relative to the scale of its operands, i.e. below
2^-40: the margins exceed it by three orders of magnitude. Tests compare lo <= exact <= hi against
50-digit mpmath on random and adversarial inputs (alpha near 0, 1/2, 1; V_t = o).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DELTA = 2.0 ** -30
ETA = 2.0 ** -30

#: names of the per-(kv head, position) maxima computed by :func:`position_stats`
MAX_FIELDS = ("alpha_max", "qnorm_max", "vo_max", "alpha_vo_max", "kappa", "grad_k", "htrace")


@dataclass
class PositionStats:
    """Per (kv head, key position) statistics of one sequence. Every tensor has shape (Hkv, Tk).

    ``<f>_lo`` / ``<f>_hi`` enclose the exact max over attending queries for f in MAX_FIELDS;
    ``alpha_sum`` and ``n_queries`` give the mean attention.
    """

    lo: dict
    hi: dict
    alpha_sum: torch.Tensor
    n_queries: torch.Tensor


def causal_allowed(tq: int, tk: int, sliding_window: int | None = None, device=None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask: query i (aligned to the last Tq keys) may attend to key t."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    t = torch.arange(tk, device=device)[None, :]
    allowed = t <= i
    if sliding_window is not None:
        allowed &= (i - t) < sliding_window
    return allowed


def position_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None = None,
    *,
    q_chunk: int = 256,
) -> PositionStats:
    """Exact per-position maxima for one sequence.

    query: (Hq, Tq, d); key, value: (Hkv, Tk, d); Hq a multiple of Hkv (GQA groups are
    consecutive query heads, as in transformers' ``repeat_kv``). allowed: bool (Tq, Tk), default
    causal. Returns :class:`PositionStats` with (Hkv, Tk) tensors in float64.
    """
    hq, tq, d = query.shape
    hkv, tk, _ = key.shape
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    if allowed is None:
        allowed = causal_allowed(tq, tk, device=query.device)
    q = query.detach().to(torch.float64).reshape(hkv, g, tq, d)
    k = key.detach().to(torch.float64)
    v = value.detach().to(torch.float64)
    tau = float(scaling)
    v_sq = (v * v).sum(-1)                               # (Hkv, Tk)
    v_norm = v_sq.sqrt()

    lo = {f: torch.zeros(hkv, tk, dtype=torch.float64) for f in MAX_FIELDS}
    hi = {f: torch.zeros(hkv, tk, dtype=torch.float64) for f in MAX_FIELDS}
    alpha_sum = torch.zeros(hkv, tk, dtype=torch.float64)
    n_queries = torch.zeros(hkv, tk, dtype=torch.int64)
    up, dn = 1.0 + DELTA, 1.0 - DELTA

    for start in range(0, tq, q_chunk):
        qc = q[:, :, start:start + q_chunk]                                 # (Hkv, G, c, d)
        mask = allowed[start:start + q_chunk].to(q.device)                  # (c, Tk)
        s = tau * torch.einsum("hgid,htd->hgit", qc, k)
        s = s.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(s, dim=-1)                                    # (Hkv, G, c, Tk)
        alpha = alpha.masked_fill(~mask, 0.0)
        o = torch.einsum("hgit,htd->hgid", alpha, v)                        # (Hkv, G, c, d)
        o_sq = (o * o).sum(-1)
        vo_sq = v_sq[:, None, None, :] - 2.0 * torch.einsum("hgid,htd->hgit", o, v) + o_sq[..., None]
        err = ETA * (v_norm[:, None, None, :] + o_sq.sqrt()[..., None]) ** 2
        vo_hi = (vo_sq + err).clamp_min(0.0).sqrt() * up
        vo_lo = (vo_sq - err).clamp_min(0.0).sqrt() * dn
        qn_sq = (qc * qc).sum(-1)[..., None]                                # (Hkv, G, c, 1)
        qn = qn_sq.sqrt()
        one_m = (1.0 - 2.0 * alpha).abs()
        a_hi, a_lo = alpha * up, alpha * dn
        half_t2q2 = 0.5 * tau * tau * qn_sq
        vals_hi = {
            "alpha_max": a_hi,
            "qnorm_max": (qn * up).expand_as(alpha),
            "vo_max": vo_hi,
            "alpha_vo_max": a_hi * vo_hi * up,
            "kappa": half_t2q2 * a_hi * (one_m + ETA) * vo_hi * up ** 3,
            "grad_k": tau * qn * a_hi * vo_hi * up ** 2,
            "htrace": 2.0 * half_t2q2 * a_hi * (one_m + ETA) * vo_hi * up ** 3,
        }
        vals_lo = {
            "alpha_max": a_lo,
            "qnorm_max": (qn * dn).expand_as(alpha),
            "vo_max": vo_lo,
            "alpha_vo_max": a_lo * vo_lo * dn,
            "kappa": half_t2q2 * a_lo * (one_m - ETA).clamp_min(0.0) * vo_lo * dn ** 3,
            "grad_k": tau * qn * a_lo * vo_lo * dn ** 2,
            "htrace": 2.0 * half_t2q2 * a_lo * (one_m - ETA).clamp_min(0.0) * vo_lo * dn ** 3,
        }
        m = mask[None, None]
        for f in MAX_FIELDS:
            h = vals_hi[f].masked_fill(~m, 0.0).amax(dim=(1, 2))
            l_ = vals_lo[f].masked_fill(~m, 0.0).amax(dim=(1, 2))
            hi[f] = torch.maximum(hi[f], h)
            lo[f] = torch.maximum(lo[f], l_)
        alpha_sum += alpha.sum(dim=(1, 2))
        n_queries += (mask.sum(0) * g).to(torch.int64)[None, :]
    return PositionStats(lo=lo, hi=hi, alpha_sum=alpha_sum, n_queries=n_queries)


def kappa_single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau: float, t: int) -> float:
    """kappa_t(q) for one query q (d,), keys/values (T, d): the closed form, in float64."""
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    alpha = torch.softmax(tau * (k @ q), dim=0)
    o = alpha @ v
    return float(0.5 * tau ** 2 * (q @ q) * alpha[t] * (1 - 2 * alpha[t]).abs() * (v[t] - o).norm())


def seed_curvature(alpha_mean: torch.Tensor, grad_k: torch.Tensor, htrace: torch.Tensor) -> torch.Tensor:
    """The original proposal's heuristic, for ablation only: attention x gradient x Hessian trace x recency.

    All (..., T). attention = mean attention weight; gradient = max ||d o / d K_t||;
    Hessian trace = max || (tr D2_{K_t} o_j)_j || = tau^2 ||q||^2 alpha |1 - 2 alpha| ||V_t - o||;
    recency r_t = exp(-(T - 1 - t) / T). Not a curvature: it has no units of one and no theorem uses it.
    """
    t_len = alpha_mean.shape[-1]
    t = torch.arange(t_len, dtype=torch.float64)
    recency = torch.exp(-(t_len - 1 - t) / t_len)
    return alpha_mean * grad_k * htrace * recency
