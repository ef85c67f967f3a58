"""Exact key curvature and first-order sensitivities of one attention head group (docs/design.md §2.1, 2.4).

For a query q, scale tau, cached keys K_t and values V_t (keys after RoPE, as cached):

    s_t = tau * q.K_t,   alpha = softmax(s),   o = sum_t alpha_t V_t
    d o / d K_t           = tau * alpha_t (V_t - o) q^T                 (operator norm tau ||q|| alpha_t ||V_t - o||)
    D2_{K_t} o [u, u]     = tau^2 (q.u)^2 alpha_t (1 - 2 alpha_t) (V_t - o)
    kappa_t(q)            = 1/2 tau^2 ||q||^2 alpha_t |1 - 2 alpha_t| ||V_t - o||
    d o / d V_t           = alpha_t I,   curvature in V_t = 0 (o is linear in V_t)

(re-derived symbolically in ``proofs/curvature_sympy.py``). For each KV head h and cached position
t, the statistics are maxima over every query that attends to t: all query heads of h's GQA group
and every query position allowed by the mask (causal, sliding window).

Enclosures. Inputs are the captured float32 tensors, which are exact rationals. Every quantity is
evaluated once in float64 (the central value), reduced by max over queries, and only then widened
to an interval [lo, hi] that contains the exact real value of that maximum for those inputs. The
margins are the larger of fixed ones and the float rounding bounds derived in docs/design.md §2.1a
(Higham's gamma_n for the dot products, the softmax, the weighted sum and the norms, per KV head):

* relative factor (1 +- delta) per multiplicative factor, delta = max(2^-30, 2 (a + gamma_(d+2) + 8u)),
  a the softmax's relative error bound (:func:`softmax_rel_error`);
* ``|1 - 2 alpha|`` gets an absolute margin eta = max(2^-30, 2a + 2u) (it cancels near alpha = 1/2);
* ``||V_t - o||`` is computed from ``||V_t||^2 - 2 V_t.o + ||o||^2`` whose float64 error is below
  max(2^-40, gamma_(d+3)) (||V_t|| + ||o||)^2, so its square root errs by at most
  EPS_t = sqrt(max(2^-40, gamma_(d+3))) (||V_t|| + max ||o||) + o_err, o_err >= ||o~ - o||;
* a product's error is bounded with the per-position maxima of its other factors, e.g.
  max kappa <= (1 + DELTA)^2 [max kappa_c + 1/2 tau^2 Q_t^2 A_t (ETA VO_t + (1 + ETA) EPS_t)],
  and symmetrically for the lower end (the maximizing query of the central value is a witness).

Tests compare lo <= exact <= hi against 50-digit mpmath on random and adversarial inputs
(alpha near 0, 1/2 and 1; V_t = o).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DELTA = 2.0 ** -30
ETA = 2.0 ** -30
GAMMA = 2.0 ** -40
U64 = 2.0 ** -53          # unit roundoff of float64
#: absolute error of a computed alpha from underflow (exp below 2^-1022 loses relative accuracy, below
#: 2^-1074 it is 0; the normalizing sum is >= 1): |alpha~ - alpha| <= a alpha + TINY (docs/design.md §2.1a)
TINY = 2.0 ** -1000
#: upward factor on the error bounds' own float64 evaluation (a few dozen roundings of positive terms)
SAFE = 1.0 + 2.0 ** -40


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float64, rounded up (docs/design.md §2.1a)."""
    if n * U64 >= 0.5:
        raise ValueError(f"gamma_{n}: too many terms for the float64 rounding bound")
    return n * U64 / (1.0 - n * U64) * SAFE

#: names of the per-(kv head, position) maxima computed by :func:`position_stats`
MAX_FIELDS = ("alpha_max", "qnorm_max", "vo_max", "alpha_vo_max", "kappa", "grad_k", "htrace")


#: default grids of rule parameters the analysis prepares for: sink prefix lengths S and recent
#: window lengths R (a rule plan stores positions t < S as sinks, positions with i - t < R for the
#: current query i in the recent window, and the rest in the "rest" format)
SINKS = (0, 1, 4, 16, 64)
WINDOWS = (0, 16, 32, 64, 128)
SEGMENTS = ("sink", "recent", "rest")


@dataclass
class PositionStats:
    """Per (kv head, key position) statistics of one sequence.

    ``lo[f]`` / ``hi[f]`` (Hkv, Tk) enclose the exact max over attending queries for f in MAX_FIELDS;
    ``alpha_sum`` and ``n_queries`` give the mean attention.
    Distance splits, for each recent-window length R in ``windows``:
    ``kappa_far_lo/hi`` (nR, Hkv, Tk): max kappa over queries with i - t >= R;
    ``kappa_near_lo/hi`` (nR, Hkv, Tk): max over queries with i - t < R (0 if none).
    Segment masses, for each (S, R) in sinks x windows and segment in SEGMENTS:
    ``mass_alpha_lo/hi`` (nS, nR, 3, Hkv): max over queries of sum_{t in segment} alpha_t;
    ``mass_avo_lo/hi``   (nS, nR, 3, Hkv): max over queries of sum_{t in segment} alpha_t ||V_t - o||.
    """

    lo: dict
    hi: dict
    alpha_sum: torch.Tensor
    n_queries: torch.Tensor
    kappa_far_lo: torch.Tensor | None = None
    kappa_far_hi: torch.Tensor | None = None
    kappa_near_lo: torch.Tensor | None = None
    kappa_near_hi: torch.Tensor | None = None
    mass_alpha_lo: torch.Tensor | None = None
    mass_alpha_hi: torch.Tensor | None = None
    mass_avo_lo: torch.Tensor | None = None
    mass_avo_hi: torch.Tensor | None = None
    #: per KV head, where the central kappa was largest: (value, group member g, query row i, key t), or None
    witness: list | None = None


def softmax_rel_error(qk, d: int, n: int):
    """a with alpha~_t / alpha_t in [1 - a, 1 + a] for a float64 softmax over n scores tau q.K_t of length-d
    vectors, qk >= tau ||q|| max_t ||K_t|| (a float or tensor): docs/design.md §2.1a."""
    e_s = gamma(d + 1) * qk
    rho = 2.0 * U64 * qk * (1.0 + gamma(d + 1))
    growth = torch.exp(torch.as_tensor(2.0 * e_s + 2.0 * rho, dtype=torch.float64))
    return (growth * (1.0 + 2 * U64) ** 2 * (1.0 + U64) ** 2 / (1.0 - gamma(n)) - 1.0) * SAFE


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
    q_chunk: int = 64,
    sinks: tuple = SINKS,
    windows: tuple = WINDOWS,
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
    allowed = allowed.to(torch.bool)
    q = query.detach().to(torch.float64).reshape(hkv, g, tq, d)
    k = key.detach().to(torch.float64)
    v = value.detach().to(torch.float64)
    tau = float(scaling)
    v_sq = (v * v).sum(-1)                                  # (Hkv, Tk)
    qn_sq_all = (q * q).sum(-1)                             # (Hkv, G, Tq)
    # float rounding (docs/design.md §2.1a): per KV head, the largest relative error of any computed
    # alpha (a_rel) and the most keys one softmax or weighted sum ran over (n_keys)
    k_norm = k.norm(dim=-1) * SAFE                          # (Hkv, Tk), rounded up
    a_rel = torch.zeros(hkv, dtype=torch.float64)
    n_keys = 1

    z = lambda: torch.zeros(hkv, tk, dtype=torch.float64)  # noqa: E731
    c_alpha, c_vo, c_avo, c_kappa, c_grad, q2_max = z(), z(), z(), z(), z(), z()
    o_norm_max = torch.zeros(hkv, dtype=torch.float64)
    alpha_sum = z()
    n_queries = torch.zeros(hkv, tk, dtype=torch.int64)
    n_r, n_s = len(windows), len(sinks)
    c_kfar = torch.zeros(n_r, hkv, tk, dtype=torch.float64)
    c_knear = torch.zeros(n_r, hkv, tk, dtype=torch.float64)
    c_mass = torch.zeros(n_s, n_r, 3, hkv, dtype=torch.float64)
    c_mavo = torch.zeros(n_s, n_r, 3, hkv, dtype=torch.float64)
    tot_avo_max = torch.zeros(hkv, dtype=torch.float64)
    witness = [None] * hkv

    for start in range(0, tq, q_chunk):
        mask_rows = allowed[start:start + q_chunk]                           # (c, Tk)
        any_col = mask_rows.any(dim=0).nonzero()
        if any_col.numel() == 0:
            continue
        # only the key range some query of this chunk attends to (causal: roughly half the work)
        k0, k1 = int(any_col[0]), int(any_col[-1]) + 1
        mask = mask_rows[:, k0:k1]
        kk, vv, vsq = k[:, k0:k1], v[:, k0:k1], v_sq[:, k0:k1]
        qc = q[:, :, start:start + q_chunk]                                  # (Hkv, G, c, d)
        qn_sq = qn_sq_all[:, :, start:start + q_chunk]                       # (Hkv, G, c)
        # |s~ - s| <= E = tau gamma_{d+1} ||q|| max ||k|| (a dot product of exact float32 products, then tau);
        # exp's argument s~ - m is rounded (u |s~ - m| <= u 2 tau ||q|| max ||k|| (1 + gamma)), exp is accurate
        # to 2u, the sum of the exps to gamma_n, the normalization to 2u: alpha~ / alpha in [1 - a, 1 + a] with
        # 1 + a = e^(2E + 2 rho) (1 + 2u)^2 (1 + u)^2 / (1 - gamma_n) (the ratio lemma L1 for the score error)
        qk = tau * (qn_sq.amax(dim=(1, 2)).sqrt() * SAFE) * k_norm[:, k0:k1].amax(dim=1)     # (Hkv,)
        n_keys = max(n_keys, k1 - k0)
        a_rel = torch.maximum(a_rel, softmax_rel_error(qk, d, k1 - k0))
        # (Hkv, G c, d) x (Hkv, d, Tkc) products; tau and -2 ride in the gemm's alpha (the bounds above hold
        # for any order of the roundings), so no separate pass scales them
        c_n = qc.shape[2]
        kt, outside = kk.transpose(1, 2), ~mask
        s = torch.empty(hkv, g * c_n, k1 - k0, dtype=q.dtype)                # beta = 0: ignored, not read
        s = torch.baddbmm(s, qc.reshape(hkv, g * c_n, d), kt, beta=0.0, alpha=tau)
        s = s.view(hkv, g, c_n, -1).masked_fill_(outside, float("-inf"))
        alpha = torch.softmax(s, dim=-1)                                     # masked entries exactly 0
        del s
        o = torch.bmm(alpha.view(hkv, g * c_n, -1), vv).view(hkv, g, c_n, d)  # (Hkv, G, c, d)
        o_sq = (o * o).sum(-1)                                               # (Hkv, G, c)
        o_norm_max = torch.maximum(o_norm_max, o_sq.sqrt().amax(dim=(1, 2)))
        vo = (o_sq[..., None] + vsq[:, None, None, :]).view(hkv, g * c_n, -1)       # ||o||^2 + ||V_t||^2
        vo = vo.baddbmm_(o.view(hkv, g * c_n, d), vv.transpose(1, 2), alpha=-2.0)
        vo = vo.view(hkv, g, c_n, -1).clamp_min_(0.0).sqrt_().masked_fill_(outside, 0.0)
        sl = slice(k0, k1)
        c_alpha[:, sl] = torch.maximum(c_alpha[:, sl], alpha.amax(dim=(1, 2)))
        c_vo[:, sl] = torch.maximum(c_vo[:, sl], vo.amax(dim=(1, 2)))
        alpha_sum[:, sl] += alpha.sum(dim=(1, 2))
        avo = vo.mul_(alpha)                                                 # alpha ||V_t - o||
        c_avo[:, sl] = torch.maximum(c_avo[:, sl], avo.amax(dim=(1, 2)))
        c_grad[:, sl] = torch.maximum(c_grad[:, sl], (avo * (tau * qn_sq.sqrt())[..., None]).amax(dim=(1, 2)))
        # attention mass (and alpha ||V_t - o|| mass) of every sink / recent / rest segment, per query.
        # With P(i, x) = sum_{t < x} w_t(i): sink = P(min(S, i+1)), recent = total - P(x_r),
        # rest = P(x_r) - sink, where x_r = min(max(S, i - R + 1), i + 1) (x_r = i + 1 when R = 0).
        i_abs = torch.arange(tk - tq + start, tk - tq + start + mask.shape[0])            # (c,)
        sv = torch.tensor(sinks, dtype=torch.int64)[:, None]                              # (nS, 1)
        rv = torch.tensor(windows, dtype=torch.int64)[None, :, None]                      # (1, nR, 1)
        x_s = torch.minimum(sv, i_abs[None] + 1)                                          # (nS, c)
        x_r = torch.minimum(torch.maximum(sv[:, :, None], i_abs - rv + 1), i_abs + 1)      # (nS, nR, c)
        x_r = torch.where(rv == 0, i_abs + 1, x_r)
        xs = torch.cat([x_s, x_r.reshape(-1, x_r.shape[-1])], 0)                          # (nX, c)
        for cum_src, c_out, is_v in ((alpha, c_mass, False), (avo, c_mavo, True)):
            cum = cum_src.cumsum(-1)
            tot = cum[..., -1]                                                           # (Hkv, G, c)
            if is_v:
                tot_avo_max = torch.maximum(tot_avo_max, tot.amax(dim=(1, 2)))
            n = cum.shape[-1]
            local = (xs - k0).clamp(0, n)                                                # keys below x
            idx = (local - 1).clamp_min(0).T                                             # (c, nX)
            pv = torch.gather(cum, -1, idx.expand(*cum.shape[:2], *idx.shape))
            pv = torch.where((local > 0).T, pv, torch.zeros((), dtype=pv.dtype))         # (Hkv, G, c, nX)
            sink = pv[..., :n_s]                                                         # (Hkv, G, c, nS)
            pr = pv[..., n_s:].reshape(*pv.shape[:3], n_s, n_r)                          # (Hkv, G, c, nS, nR)
            seg = torch.stack([sink[..., None].expand_as(pr), tot[..., None, None] - pr, pr - sink[..., None]], -1)
            m = seg.amax(dim=(1, 2)).permute(1, 2, 3, 0)                                 # (nS, nR, 3, Hkv)
            torch.maximum(c_out, m, out=c_out)
            del cum, pv, seg
        kap = alpha.mul_(-2.0).add_(1.0).abs_().mul_(avo).mul_((0.5 * tau * tau) * qn_sq[..., None])
        c_kappa[:, sl] = torch.maximum(c_kappa[:, sl], kap.amax(dim=(1, 2)))
        w_val, w_at = kap.reshape(hkv, -1).max(dim=1)                       # the witness (docs/design.md §2.1b)
        n_rows, n_cols = kap.shape[2], kap.shape[3]
        for h in range(hkv):
            val = float(w_val[h])
            if val > 0 and (witness[h] is None or val > witness[h][0]):
                f = int(w_at[h])
                witness[h] = (val, f // (n_rows * n_cols), start + (f // n_cols) % n_rows, k0 + f % n_cols)
        # kappa split by query distance i - t: far (>= R) and near (< R) queries, via running maxima
        # over query rows: SM[r, t] = max_{r' >= r} kg[r', t] and PM[r, t] = max_{r' <= r} kg[r', t]
        kg = kap.amax(dim=1).transpose(1, 2).contiguous()                    # (Hkv, Tkc, c): rows last
        n_rows = kg.shape[2]
        sm = kg.flip(2).cummax(dim=2).values.flip(2)
        pm = kg.cummax(dim=2).values
        tt = torch.arange(k0, k1)[:, None]                                   # (Tkc, 1)
        rr = torch.tensor(windows, dtype=torch.int64)[None, :]               # (1, nR)
        r0 = tt + rr - i_abs[0]                                              # first far row, (Tkc, nR)
        far_v = torch.gather(sm, 2, r0.clamp(0, n_rows - 1).expand(hkv, *r0.shape))
        far_v = torch.where((r0 < n_rows)[None], far_v, torch.zeros((), dtype=far_v.dtype))
        r1 = tt + rr - 1 - i_abs[0]                                          # last near row
        near_v = torch.gather(pm, 2, r1.clamp(0, n_rows - 1).expand(hkv, *r1.shape))
        near_v = torch.where((r1 >= 0)[None], near_v, torch.zeros((), dtype=near_v.dtype))
        far_v, near_v = far_v.transpose(1, 2), near_v.transpose(1, 2)       # (Hkv, nR, Tkc)
        c_kfar[:, :, sl] = torch.maximum(c_kfar[:, :, sl], far_v.permute(1, 0, 2))
        c_knear[:, :, sl] = torch.maximum(c_knear[:, :, sl], near_v.permute(1, 0, 2))
        del alpha, vo, avo, kap, kg, sm, pm
        qmax_c = qn_sq.amax(dim=1)                                           # (Hkv, c) over the group
        q2 = torch.where(mask[None], qmax_c[..., None], torch.zeros((), dtype=torch.float64)).amax(dim=1)
        q2_max[:, sl] = torch.maximum(q2_max[:, sl], q2)
        n_queries[:, sl] += (mask.sum(0) * g).to(torch.int64)[None, :]

    # the margins (docs/design.md §2.1a): the fixed ones, widened wherever the derived rounding bounds exceed
    # them. delta: relative, per factor (alpha: a_rel; norms and products: gamma_{d+2} and a few u); eta:
    # absolute on |1 - 2 alpha|; gam2: the expansion ||V||^2 - 2 V.o + ||o||^2 (gamma_{d+3}); o_err: ||o~ - o||
    # (the weighted sum's gamma_n and alpha's error, times max ||V_t||); mu: absolute on segment masses
    # (cumulative sums, and rest = total - sink - recent)
    delta = torch.clamp(2.0 * (a_rel + gamma(d + 2) + 8 * U64), min=DELTA)          # (Hkv,)
    eta = torch.clamp(2.0 * a_rel + 2 * U64, min=ETA) * SAFE
    gam2 = max(GAMMA, gamma(d + 3))
    o_err = ((gamma(n_keys) * (1.0 + a_rel) + a_rel) + n_keys * TINY) * (v_sq.sqrt().amax(dim=1) * SAFE) * SAFE
    mu = torch.clamp(3.0 * (gamma(n_keys) * (1.0 + a_rel) + a_rel) + 4 * U64, min=DELTA) * SAFE
    up, dn = 1.0 + delta[:, None], 1.0 - delta[:, None]                     # against (Hkv, Tk) fields
    eps = (math.sqrt(gam2) * (v_sq.sqrt() + o_norm_max[:, None]) + o_err[:, None]) * SAFE   # error of ||V_t - o||
    eta = eta[:, None]
    q_max = q2_max.sqrt()
    vo_hi, vo_lo = (c_vo + eps) * up, (c_vo - eps).clamp_min(0.0) * dn
    a_hi, a_lo = c_alpha * up + TINY, (c_alpha * dn - TINY).clamp_min(0.0)
    k_err = 0.5 * tau * tau * q2_max * a_hi * (eta * vo_hi + (1.0 + eta) * eps) \
        + 0.5 * tau * tau * q2_max * TINY * (1.0 + eta) * vo_hi * SAFE     # alpha's underflow (TINY)
    g_err = tau * q_max * (a_hi * eps + TINY * vo_hi) * SAFE
    av_err = (a_hi * eps + TINY * vo_hi) * SAFE
    hi = {
        "alpha_max": a_hi,
        "qnorm_max": q_max * up,
        "vo_max": vo_hi,
        "alpha_vo_max": (c_avo + av_err) * up ** 2,
        "kappa": (c_kappa + k_err) * up ** 3,
        "grad_k": (c_grad + g_err) * up ** 3,
    }
    lo = {
        "alpha_max": a_lo,
        "qnorm_max": q_max * dn,
        "vo_max": vo_lo,
        "alpha_vo_max": (c_avo - av_err).clamp_min(0.0) * dn ** 2,
        "kappa": (c_kappa - k_err).clamp_min(0.0) * dn ** 3,
        "grad_k": (c_grad - g_err).clamp_min(0.0) * dn ** 3,
    }
    hi["htrace"], lo["htrace"] = 2.0 * hi["kappa"], 2.0 * lo["kappa"]
    kfar_hi, kfar_lo = (c_kfar + k_err) * up ** 3, (c_kfar - k_err).clamp_min(0.0) * dn ** 3
    knear_hi, knear_lo = (c_knear + k_err) * up ** 3, (c_knear - k_err).clamp_min(0.0) * dn ** 3
    # sums over a segment: relative delta, plus mu absolute (the sums' rounding and rest = total - sink - recent);
    # alpha ||V_t - o|| sums also carry the ||V_t - o|| error, at most max_t EPS_t since sum alpha <= 1 + a_rel
    eps_max = eps.amax(dim=1) * (1.0 + a_rel) * SAFE                         # (Hkv,)
    upm, dnm = 1.0 + delta, 1.0 - delta                                      # against (..., Hkv) masses
    m_hi, m_lo = c_mass * upm + mu, (c_mass * dnm - mu).clamp_min(0.0)
    mv_err = eps_max + mu * tot_avo_max
    mv_hi, mv_lo = (c_mavo + mv_err) * upm, (c_mavo - mv_err).clamp_min(0.0) * dnm
    return PositionStats(lo=lo, hi=hi, alpha_sum=alpha_sum, n_queries=n_queries,
                         kappa_far_lo=kfar_lo, kappa_far_hi=kfar_hi, kappa_near_lo=knear_lo, kappa_near_hi=knear_hi,
                         mass_alpha_lo=m_lo, mass_alpha_hi=m_hi, mass_avo_lo=mv_lo, mass_avo_hi=mv_hi,
                         witness=witness)


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
