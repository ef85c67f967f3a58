"""The witness re-evaluation (docs/design.md §2.1b) against 50-digit mpmath, and the analysis' use of it."""

import mpmath
import numpy as np
import pytest
import torch

from hnfverify.analysis.witness import enclose
from proofs.analyzer_rounding import round_apart_pair


def _exact(q, k, v, tau, ok, t):
    mpmath.mp.dps = 50
    Q = [mpmath.mpf(float(x)) for x in q]
    idx = [j for j in range(k.shape[0]) if ok[j]]
    s = {j: mpmath.mpf(tau) * mpmath.fsum(a * mpmath.mpf(float(b)) for a, b in zip(Q, k[j])) for j in idx}
    m = max(s.values())
    e = {j: mpmath.exp(s[j] - m) for j in idx}
    z = mpmath.fsum(e.values())
    al = {j: e[j] / z for j in idx}
    o = [mpmath.fsum(al[j] * mpmath.mpf(float(v[j, c])) for j in idx) for c in range(v.shape[1])]
    vo = mpmath.sqrt(mpmath.fsum((mpmath.mpf(float(v[t, c])) - o[c]) ** 2 for c in range(v.shape[1])))
    qn2 = mpmath.fsum(x * x for x in Q)
    a = al[t]
    return {"alpha": a, "vo": vo, "alpha_vo": a * vo, "kappa": mpmath.mpf(tau) ** 2 * qn2 * a * abs(1 - 2 * a) * vo / 2,
            "grad": mpmath.mpf(tau) * mpmath.sqrt(qn2) * a * vo}


CASES = [("ordinary", 0.5, 40, 16), ("sharp", 6.0, 30, 8), ("wide", 0.1, 64, 32)]


@pytest.mark.parametrize("name,scale,n,d", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_witness_encloses_the_exact_values(name, scale, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(d, generator=g) * scale).float().numpy()
    k = (torch.randn(n, d, generator=g) * scale).float().numpy()
    v = torch.randn(n, d, generator=g).float().numpy()
    ok = np.arange(n) <= n - 1 - seed                      # causal-like: the last keys are masked
    if seed == 1:
        k[1:4] = k[0]                                      # ties
    for t in (0, int(np.nonzero(ok)[0][-1])):
        enc = enclose(q, k, v, 0.125, ok, t)
        ex = _exact(q, k, v, 0.125, ok, t)
        for f, val in ex.items():
            lo, hi = getattr(enc, f)
            assert mpmath.mpf(lo) <= val <= mpmath.mpf(hi), (f, lo, float(val), hi)
            assert hi - lo <= 1e-9 * float(val) + 1e-300 or float(val) < 1e-200


def test_witness_holds_where_float64_scores_round_far_from_exact():
    """The adversarial family of tests/analysis/test_curvature.py: two keys of one exact score near 1e9 whose
    float64 dot products round apart (the exact alpha is 1/2 at both)."""
    q, k, v = round_apart_pair(1)
    k, v = k.numpy(), v.numpy()
    enc = enclose(q.numpy(), k, v, 0.125, np.ones(2, dtype=bool), 1)
    ex = _exact(q.numpy(), k, v, 0.125, np.ones(2, dtype=bool), 1)
    assert mpmath.mpf(enc.alpha[0]) <= ex["alpha"] <= mpmath.mpf(enc.alpha[1])
    assert enc.alpha[0] <= 0.5 <= enc.alpha[1]


def test_analysis_checks_every_layers_witness_and_stops_when_the_float_enclosure_misses_it(monkeypatch):
    from hnfverify.analysis import analyzer
    from hnfverify.analysis.analyzer import AnalysisOptions, analyze
    from hnfverify.errors import ModelError
    from hnfverify.models import tiny_model
    from hnfverify.texts import TokenWindows

    lm = tiny_model("tiny-llama")
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0)).tolist(), 1)
    opts = AnalysisOptions(lipschitz_iters=0, suffix_iters=0)
    res = analyze(lm, wins, opts)
    w = res.meta["witnesses"]
    assert w["layers"] == lm.model.config.num_hidden_layers
    assert 0 <= w["kappa_hi_over_witness_lo_minus_1"] < 1e-3      # the float enclosure is tight there
    # a mutant whose enclosures are 1e-3 too low everywhere: the witness check must refuse it
    real = analyzer.position_stats

    def low(*a, **kw):
        st = real(*a, **kw)
        for f in st.hi:
            st.hi[f] = st.hi[f] * (1 - 1e-3)
        return st

    monkeypatch.setattr(analyzer, "position_stats", low)
    with pytest.raises(ModelError, match="witness"):
        analyze(lm, wins, opts)
