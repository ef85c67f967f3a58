"""A check of the analyzer's float rounding bounds (written derivation: docs/design.md §2.1a; code:
hnfverify/analysis/curvature.py). Exits non-zero unless every bound holds on every case AND the fixed
margins alone are refuted on the adversarial family (so the check can see what it is there to see).

For each case, float32 inputs q (d,), K, V (n, d) are evaluated the way ``position_stats`` evaluates them
(float64 einsum scores times tau, torch.softmax, einsum weighted sum) and exactly (mpmath, 60 digits, the
float32 inputs as exact rationals). Checked, per case:

  |alpha~_t - alpha_t| <= a alpha_t + TINY    a = softmax_rel_error(tau ||q|| max ||K_t||, d, n),
                                              TINY = 2^-1000 (underflow: an exp below 2^-1022)
  ||o~ - o|| <= (gamma_n (1 + a) + a + n TINY) max_t ||V_t||

Families (seeded): ordinary scores (randn at scales 0.3-30, the range of real models); near ties
(several keys of one exact score); a dominant key (alpha ~ 1 and ~ 1e-30 elsewhere); and the adversarial
family — two keys of equal exact score near 1e9 whose float64 dot products round apart — on which the
old fixed relative margin 2^-30 must be refuted (a computed alpha outside it) while the derived bound
holds. The exp of torch's float64 softmax is the one library function trusted (to 2u); these cases
test that assumption too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mpmath
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnfverify.analysis.curvature import TINY, gamma, softmax_rel_error  # noqa: E402

mpmath.mp.dps = 60
FIXED = 2.0 ** -30


def computed(q, k, v, tau):
    """The analyzer's float64 path: scores, alpha, o."""
    d = q.shape[-1]
    s = torch.einsum("hgid,htd->hgit", q.double().reshape(1, 1, 1, d), k.double()[None]).mul_(tau)
    alpha = torch.softmax(s, dim=-1)
    o = torch.einsum("hgit,htd->hgid", alpha, v.double()[None])
    return alpha[0, 0, 0], o[0, 0, 0]


def exact(q, k, v, tau):
    Q = [mpmath.mpf(float(x)) for x in q]
    s = [mpmath.mpf(tau) * mpmath.fsum(a * mpmath.mpf(float(b)) for a, b in zip(Q, row)) for row in k]
    m = max(s)
    e = [mpmath.exp(x - m) for x in s]
    z = mpmath.fsum(e)
    al = [x / z for x in e]
    o = [mpmath.fsum(al[t] * mpmath.mpf(float(v[t, c])) for t in range(len(al))) for c in range(v.shape[1])]
    return al, o


def check(q, k, v, tau, fails, name):
    """Returns the largest relative deviation of a computed alpha from the exact one."""
    a_t, o_t = computed(q, k, v, tau)
    al, o = exact(q, k, v, tau)
    n, d = k.shape
    qk = tau * float(q.double().norm()) * float(k.double().norm(dim=-1).max()) * (1 + 2 ** -40)
    a = float(softmax_rel_error(qk, d, n))
    worst = mpmath.mpf(0)
    for t in range(n):
        err = abs(mpmath.mpf(float(a_t[t])) - al[t])
        if err > a * al[t] + TINY:
            fails.append(f"{name}: |alpha~_{t} - alpha_{t}| = {mpmath.nstr(err, 5)} > a alpha + TINY (a = {a:.3e})")
        if al[t] > 2 ** -1000:
            worst = max(worst, err / al[t])
    o_err = (gamma(n) * (1 + a) + a + n * TINY) * float(v.double().norm(dim=-1).max())
    dist = mpmath.sqrt(mpmath.fsum((mpmath.mpf(float(o_t[c])) - o[c]) ** 2 for c in range(d)))
    if dist > o_err:
        fails.append(f"{name}: ||o~ - o|| = {mpmath.nstr(dist, 5)} > {o_err:.3e}")
    return worst


def round_apart_pair(seed: int, d: int = 64):
    """The adversarial family: q (d,), K (2, d), V (2, d) float32 with q.K_1 = q.K_2 exactly (K_2 swaps two
    channels of K_1 where q is equal) near 1e9, so that float64 dot products round them apart."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(d, generator=g) * 30000).float()
    k1 = (torch.randn(d, generator=g) * 30000).float()
    q[d - 1] = q[0]
    k1[0] *= 50
    k2 = k1.clone()
    k2[0], k2[d - 1] = k1[d - 1], k1[0]
    return q, torch.stack([k1, k2]), torch.randn(2, d, generator=g).float()


def main() -> int:
    fails: list = []
    n_cases = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        n, d = [(4, 8), (16, 16), (48, 64)][seed % 3]
        scale = [0.3, 3.0, 30.0][seed % 3]
        q = (torch.randn(d, generator=g) * scale).float()
        k = (torch.randn(n, d, generator=g) * scale).float()
        v = torch.randn(n, d, generator=g).float()
        if seed % 4 == 1:                                   # near ties: copies of one key
            k[1:4] = k[0]
        if seed % 4 == 2:                                   # a dominant key: alpha ~ 1, others ~ 1e-30
            k[0] = q * 4
        check(q, k, v, 0.125, fails, f"ordinary seed {seed}")
        n_cases += 1
    refuted = 0
    for seed in range(40):                                  # the adversarial family
        q, k, v = round_apart_pair(seed)
        worst = check(q, k, v, 0.125, fails, f"adversarial seed {seed}")
        n_cases += 1
        if worst > FIXED:
            refuted += 1
    print(f"analyzer rounding: {n_cases} cases (60-digit mpmath), {len(fails)} failures; the fixed margin 2^-30 "
          f"refuted on {refuted} of 40 adversarial cases")
    for f in fails[:10]:
        print("  FAIL", f)
    if fails or refuted == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
