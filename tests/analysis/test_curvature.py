"""The exact curvature closed form against autograd Hessians and 50-digit mpmath enclosures."""

import math

import mpmath
import pytest
import torch
from hypothesis import given, strategies as st

from hnfverify.analysis.curvature import causal_allowed, kappa_single, position_stats
from proofs.analyzer_rounding import round_apart_pair
from tests.strategies import alpha_targets, head_layouts


def _keys_for_alpha(q, t_len, t, alpha_t, tau, gen):
    """Keys such that softmax(tau q.K) gives alpha_t at position t (others share the rest)."""
    d = q.shape[0]
    rest = (1.0 - alpha_t) / (t_len - 1) if t_len > 1 else 0.0
    logits = torch.full((t_len,), math.log(rest) if rest > 0 else -50.0, dtype=torch.float64)
    logits[t] = math.log(alpha_t)
    noise = torch.randn(t_len, d, generator=gen, dtype=torch.float64)
    noise -= (noise @ q)[:, None] * q[None, :] / (q @ q)        # orthogonal to q
    return logits[:, None] * q[None, :] / (tau * (q @ q)) + noise


def _autograd_kappa(q, k, v, tau, t):
    """1/2 max_{|u|=1} ||D2_{K_t} o [u, u]|| from torch.autograd Hessians of every output component."""
    def out(kt):
        kk = torch.cat([k[:t], kt[None], k[t + 1:]])
        a = torch.softmax(tau * (kk @ q), 0)
        return a @ v

    d_v = v.shape[1]
    hs = [torch.autograd.functional.hessian(lambda kt, j=j: out(kt)[j], k[t].clone()) for j in range(d_v)]
    u = q / q.norm()
    val = torch.stack([u @ h @ u for h in hs]).norm()
    # the maximum over unit u is attained at q/|q| because every H_j is a multiple of q q^T
    gen = torch.Generator().manual_seed(1)
    # scale of the individual terms of the Hessian (before any cancellation at alpha = 1/2)
    noise = 1e-10 * tau ** 2 * float(q @ q) * float(v.abs().max())
    for _ in range(20):
        w = torch.randn(q.shape[0], generator=gen, dtype=torch.float64)
        w /= w.norm()
        assert torch.stack([w @ h @ w for h in hs]).norm() <= val * (1 + 1e-9) + noise
    return 0.5 * float(val)


@given(t_len=st.integers(1, 12), d=st.integers(2, 8), alpha_t=alpha_targets, seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.125, 0.35, 1.0]))
def test_kappa_matches_autograd_hessian(t_len, d, alpha_t, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    t = int(torch.randint(0, t_len, (1,), generator=gen))
    if t_len == 1:
        alpha_t = 1.0
    q = torch.randn(d, generator=gen, dtype=torch.float64) * 2
    k = _keys_for_alpha(q, t_len, t, alpha_t, scale, gen)
    v = torch.randn(t_len, d, generator=gen, dtype=torch.float64) * 3
    ref = _autograd_kappa(q, k, v, scale, t)
    closed = kappa_single(q, k, v, scale, t)
    assert closed == pytest.approx(ref, rel=1e-6, abs=1e-12)
    # the analyzer's enclosure for a single query (one allowed row)
    st_ = position_stats(q[None, None].float().double(), k[None], v[None], scale,
                         torch.ones(1, t_len, dtype=torch.bool))
    lo, hi = float(st_.lo["kappa"][0, t]), float(st_.hi["kappa"][0, t])
    assert lo <= ref * (1 + 1e-9) + 1e-12 and ref <= hi * (1 + 1e-9) + 1e-12
    # tight: relative 1e-6, plus the absolute |1 - 2 alpha| margin where alpha ~ 1/2 cancels
    a = torch.softmax(scale * (k @ q), 0)
    no_cancel = 0.5 * scale ** 2 * float(q @ q) * float(a[t]) * (float(v[t].norm()) + float((a @ v).norm()))
    assert hi - lo <= 1e-6 * ref + 1e-5 * no_cancel + 1e-15


def _mp_stats(q, k, v, tau, allowed, t):
    """Exact maxima at key position t with 50-digit arithmetic. q (Hq,Tq,d), k/v (Hkv,Tk,d) float32."""
    mpmath.mp.dps = 50
    hq, tq, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    out = []
    for h in range(hkv):
        K = [[mpmath.mpf(float(x)) for x in row] for row in k[h]]
        V = [[mpmath.mpf(float(x)) for x in row] for row in v[h]]
        best = dict(alpha=0, qn=0, vo=0, avo=0, kappa=0, grad=0)
        for gi in range(g):
            for i in range(tq):
                if not bool(allowed[i, t]):
                    continue
                Q = [mpmath.mpf(float(x)) for x in q[h * g + gi, i]]
                idx = [j for j in range(k.shape[1]) if bool(allowed[i, j])]
                s = {j: mpmath.mpf(tau) * mpmath.fsum(a * b for a, b in zip(Q, K[j])) for j in idx}
                m = max(s.values())
                e = {j: mpmath.exp(s[j] - m) for j in idx}
                z = mpmath.fsum(e.values())
                al = {j: e[j] / z for j in idx}
                o = [mpmath.fsum(al[j] * V[j][c] for j in idx) for c in range(d)]
                vo = mpmath.sqrt(mpmath.fsum((V[t][c] - o[c]) ** 2 for c in range(d)))
                qn2 = mpmath.fsum(x * x for x in Q)
                a = al[t]
                kap = mpmath.mpf(tau) ** 2 * qn2 * a * abs(1 - 2 * a) * vo / 2
                for key, val in (("alpha", a), ("qn", mpmath.sqrt(qn2)), ("vo", vo), ("avo", a * vo),
                                 ("kappa", kap), ("grad", mpmath.mpf(tau) * mpmath.sqrt(qn2) * a * vo)):
                    best[key] = max(best[key], val)
        out.append(best)
    return out


FIELDS = {"alpha": "alpha_max", "qn": "qnorm_max", "vo": "vo_max", "avo": "alpha_vo_max",
          "kappa": "kappa", "grad": "grad_k"}


def _check_enclosure(q, k, v, tau, allowed, positions):
    st_ = position_stats(q, k, v, tau, allowed)
    for t in positions:
        exact = _mp_stats(q, k, v, tau, allowed, t)
        for h, best in enumerate(exact):
            for key, field in FIELDS.items():
                lo, hi = float(st_.lo[field][h, t]), float(st_.hi[field][h, t])
                assert mpmath.mpf(lo) <= best[key] <= mpmath.mpf(hi), (field, h, t, lo, float(best[key]), hi)


@given(layout=head_layouts, t_len=st.integers(1, 10), d=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16),
       sharp=st.sampled_from([0.3, 1.0, 4.0]))
def test_enclosure_contains_exact_max_random(layout, t_len, d, seed, sharp):
    hq, hkv = layout
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(hq, t_len, d, generator=gen) * sharp).float()
    k = (torch.randn(hkv, t_len, d, generator=gen) * sharp).float()
    v = torch.randn(hkv, t_len, d, generator=gen).float()
    _check_enclosure(q, k, v, 0.5, causal_allowed(t_len, t_len), range(t_len))


def test_enclosure_adversarial_equal_values_and_half_alpha():
    # identical values: o == V_t exactly, so ||V_t - o|| = 0 and kappa = 0
    q = torch.ones(2, 4, 4)
    k = torch.ones(1, 4, 4)
    v = torch.full((1, 4, 4), 3.0)
    st_ = position_stats(q, k, v, 0.5)
    assert float(st_.lo["kappa"].max()) == 0.0
    _check_enclosure(q, k, v, 0.5, causal_allowed(4, 4), range(4))
    # two identical keys: alpha = 1/2 exactly at the second query, |1 - 2 alpha| = 0
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    k = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    _check_enclosure(q, k, v, 1.0, causal_allowed(2, 2), range(2))
    # a sharp key: alpha -> 1 at one position and ~0 elsewhere
    q = torch.tensor([[[8.0, 0.0]] * 3])
    k = torch.tensor([[[0.0, 1.0], [6.0, 0.0], [-6.0, 0.0]]])
    v = torch.tensor([[[1.0, 2.0], [-1.0, 0.5], [4.0, 4.0]]])
    _check_enclosure(q, k, v, 1.0, causal_allowed(3, 3), range(3))


def test_sliding_window_mask_restricts_queries():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 4, generator=gen)
    k = torch.randn(1, 12, 4, generator=gen)
    v = torch.randn(1, 12, 4, generator=gen)
    allowed = causal_allowed(12, 12, sliding_window=3)
    st_ = position_stats(q, k, v, 0.5, allowed)
    assert st_.n_queries[0].tolist() == [2 * int(allowed[:, t].sum()) for t in range(12)]
    _check_enclosure(q, k, v, 0.5, allowed, [0, 5, 11])


def _naive_splits(q, k, v, tau, allowed, sinks, windows):
    """Brute force: kappa split by query distance, and per-segment masses, in float64 loops."""
    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    g = hq // hkv
    kfar = torch.zeros(len(windows), hkv, tk, dtype=torch.float64)
    knear = torch.zeros_like(kfar)
    mass = torch.zeros(len(sinks), len(windows), 3, hkv, dtype=torch.float64)
    mavo = torch.zeros_like(mass)
    for h in range(hkv):
        kk, vv = k[h].double(), v[h].double()
        for gi in range(g):
            for i in range(tq):
                qq = q[h * g + gi, i].double()
                ok = allowed[i]
                s = (tau * (kk @ qq)).masked_fill(~ok, float("-inf"))
                a = torch.softmax(s, 0)
                o = a @ vv
                vo = (vv - o).norm(dim=1)
                kap = 0.5 * tau ** 2 * float(qq @ qq) * a * (1 - 2 * a).abs() * vo
                for t in range(tk):
                    if not ok[t]:
                        continue
                    for ri, r in enumerate(windows):
                        if i - t >= r:
                            kfar[ri, h, t] = max(kfar[ri, h, t], kap[t])
                        else:
                            knear[ri, h, t] = max(knear[ri, h, t], kap[t])
                for si, s_len in enumerate(sinks):
                    for ri, r in enumerate(windows):
                        seg = [0.0, 0.0, 0.0]
                        segv = [0.0, 0.0, 0.0]
                        for t in range(tk):
                            if not ok[t]:
                                continue
                            j = 0 if t < s_len else (1 if i - t < r else 2)
                            seg[j] += float(a[t])
                            segv[j] += float(a[t] * vo[t])
                        for j in range(3):
                            mass[si, ri, j, h] = max(mass[si, ri, j, h], seg[j])
                            mavo[si, ri, j, h] = max(mavo[si, ri, j, h], segv[j])
    return kfar, knear, mass, mavo


@given(layout=head_layouts, t_len=st.integers(1, 14), seed=st.integers(0, 2**16),
       window=st.sampled_from([None, 4]), chunk=st.sampled_from([3, 128]))
def test_distance_splits_and_segment_masses_match_brute_force(layout, t_len, seed, window, chunk):
    hq, hkv = layout
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, t_len, 4, generator=gen) * 2
    k = torch.randn(hkv, t_len, 4, generator=gen) * 2
    v = torch.randn(hkv, t_len, 4, generator=gen)
    allowed = causal_allowed(t_len, t_len, sliding_window=window)
    sinks, windows = (0, 1, 3), (0, 2, 5)
    st_ = position_stats(q, k, v, 0.5, allowed, q_chunk=chunk, sinks=sinks, windows=windows)
    kfar, knear, mass, mavo = _naive_splits(q, k, v, 0.5, allowed, sinks, windows)

    def inside(lo, hi, ref):
        tol = 1e-9 * ref.abs().max().item() + 1e-12
        assert torch.all(lo <= ref + tol) and torch.all(ref <= hi + tol)

    inside(st_.kappa_far_lo, st_.kappa_far_hi, kfar)
    inside(st_.kappa_near_lo, st_.kappa_near_hi, knear)
    inside(st_.mass_alpha_lo, st_.mass_alpha_hi, mass)
    inside(st_.mass_avo_lo, st_.mass_avo_hi, mavo)
    # far with R = 0 is the unrestricted max
    assert torch.equal(st_.kappa_far_hi[0], st_.hi["kappa"])


def test_enclosure_holds_where_float64_scores_round_far_from_exact():
    """Scores near 1e9: two keys with the same exact score (a permutation of channels where the query is
    equal) whose float64 dot products round apart, so the computed alpha misses the exact 1/2 by ~1e-7 —
    a hundred times the old fixed margin 2^-30. The enclosure must still contain the exact maxima: its
    margins are the derived rounding bounds where those exceed the fixed ones (docs/design.md §2.1a).
    Failed before the fix (alpha_max's lower end was above the exact 1/2)."""
    d = 64
    q, k, v = round_apart_pair(1, d)
    q, k, v = q.reshape(1, 1, d), k[None], v[None]
    s = torch.einsum("hgid,htd->hgit", q.double().reshape(1, 1, 1, d), k.double()).mul_(0.125)
    assert abs(float(torch.softmax(s, -1)[0, 0, 0, 0]) - 0.5) > 2.0 ** -30     # the case is what it claims
    _check_enclosure(q, k, v, 0.125, torch.ones(1, 2, dtype=torch.bool), range(2))
