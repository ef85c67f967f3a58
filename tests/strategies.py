"""Shared hypothesis strategies."""

from hypothesis import strategies as st

#: target attention weights for one distinguished position: near 0, near 1/2, near 1, or anywhere
alpha_targets = st.one_of(
    st.floats(1e-6, 1e-3),
    st.floats(0.499, 0.501),
    st.just(0.5),
    st.floats(0.999, 1.0 - 1e-7),
    st.floats(0.01, 0.99),
)

#: (query heads, kv heads) with GQA groups
head_layouts = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2), (9, 3)])


# --------------------------------------------------------------------------- synthetic analysis reports
@st.composite
def reports(draw, max_layers=3, max_heads=2):
    """(summary, arrays) shaped like ``hnfverify.analysis.report`` output, small and random but well-formed."""
    import numpy as np

    n_l = draw(st.integers(1, max_layers))
    n_h = draw(st.integers(1, max_heads))
    g = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([4, 8, 16]))
    cg = draw(st.sampled_from([4, 8]))
    w = draw(st.integers(12, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    sinks, windows = [0, 1, 4], [0, 4, 8]
    n_s, n_r = len(sinks), len(windows)

    def pos(*shape, lo=0.0, hi=1.0):
        return rng.uniform(lo, hi, size=shape)

    kscale = draw(st.sampled_from([0.01, 1.0, 30.0]))
    kap = pos(n_l, n_h, w, hi=kscale)
    far = np.minimum(pos(n_l, n_r, n_h, w, hi=kscale), kap[:, None])
    far[:, 0] = kap
    near = np.minimum(pos(n_l, n_r, n_h, w, hi=kscale), kap[:, None])
    near[:, 0] = 0.0
    arrays = {
        "kappa_exact_lo": kap * 0.999, "kappa_exact_hi": kap, "kappa_lo": kap * 0.999, "kappa_hi": kap,
        "kappa_seed": pos(n_l, n_h, w, hi=kscale),
        "kappa_far_lo": far * 0.999, "kappa_far_hi": far, "kappa_near_lo": near * 0.999, "kappa_near_hi": near,
        "alpha_max_hi": pos(n_l, n_h, w), "qnorm_max_hi": pos(n_l, n_h, w, lo=1, hi=5),
        "vo_max_hi": pos(n_l, n_h, w, hi=3), "mass_alpha_hi": pos(n_l, n_s, n_r, 3, n_h),
        "mass_avo_hi": pos(n_l, n_s, n_r, 3, n_h, hi=3),
        "o_proj_norm_kvhead": pos(n_l, n_h, lo=0.5, hi=3),
        "lipschitz": pos(n_l, lo=1, hi=3),
        "scaling": np.full(n_l, d ** -0.5),
    }
    arrays["mlp_lipschitz"] = np.linspace(1.0, 1.5, n_l)     # not drawn: the other arrays are unchanged
    for f in ("alpha_max", "qnorm_max", "vo_max", "mass_alpha", "mass_avo"):
        arrays[f"{f}_lo"] = arrays[f"{f}_hi"] * 0.9
    for kv in ("k", "v"):
        lo_ = -pos(n_l, n_h, w, lo=0.1, hi=5)
        hi_ = pos(n_l, n_h, w, lo=0.1, hi=5)
        arrays[f"{kv}_tok_min"], arrays[f"{kv}_tok_max"] = lo_.astype(np.float32), hi_.astype(np.float32)
        arrays[f"{kv}_d_token"] = (hi_ - lo_) * np.sqrt(d)
        arrays[f"{kv}_d_channel"] = (hi_ - lo_) * np.sqrt(d) * pos(n_l, n_h, w, lo=0.2, hi=1.0)
    # the rotated formats' ranges (docs/design.md §2.3c), from a generator of their own: the arrays above are
    # those drawn before they existed
    rot = np.random.default_rng(seed + 1)
    for kv in ("k", "v"):
        amax = np.maximum(-arrays[f"{kv}_tok_min"], arrays[f"{kv}_tok_max"]).astype(np.float64)
        a_h = amax * rot.uniform(0.2, 1.0, size=amax.shape)
        arrays[f"{kv}_rot_min"], arrays[f"{kv}_rot_max"] = -a_h * rot.uniform(0.5, 1.0, size=amax.shape), a_h
        arrays[f"{kv}_d_token_h"] = (arrays[f"{kv}_rot_max"] - arrays[f"{kv}_rot_min"]) * np.sqrt(d)
    summary = {
        "shape": {"layers": n_l, "kv_heads": n_h, "query_heads": n_h * g, "head_dim": d, "positions": w},
        "rule_grid": {"sinks": sinks, "windows": windows, "segments": ["sink", "recent", "rest"]},
        "analysis": {"curvature": "exact", "channel_group": cg, "lipschitz_tokens": 8, "lipschitz_iters": 4},
        "calibration": {"token_ids_sha256": "0" * 64, "n_windows": 1, "n_tokens": w, "source": "synthetic"},
        "model": {"name": "synthetic", "config_sha256": "1" * 64},
        "arrays": {"sha256": "2" * 64},
    }
    return summary, arrays


# --------------------------------------------------------------------------- numbers, formats, plans
def intervals(max_value=10**6):
    """[lo, hi] as Fractions with 0 <= lo <= hi."""
    frac = st.fractions(min_value=0, max_value=max_value, max_denominator=10**12)
    return st.tuples(frac, frac).map(lambda t: (min(t), max(t)))


def formats(head_dim=16, channel_group=8):
    from hnfverify.core.formats import format_table

    return st.sampled_from(sorted(format_table(head_dim, channel_group).values(), key=lambda f: f.name))


@st.composite
def plans(draw, **kw):
    """Plans made by the planner from synthetic reports (eps mode), or None where infeasible."""
    from fractions import Fraction

    from hnfverify.planning import PlanInfeasible, PlanRequest, plan_from_report

    summary, arrays = draw(reports())
    eps = draw(st.sampled_from([Fraction(5), Fraction(50), Fraction(1000), Fraction(10**6)]))
    try:
        return plan_from_report(summary, arrays, PlanRequest(eps=eps, sink=1, recent=4))
    except PlanInfeasible:
        return None


def fixed_report():
    """One small report with two layers and a large curvature, found deterministically."""
    import numpy as np
    from hypothesis import find

    return find(reports(), lambda r: r[0]["shape"]["layers"] == 2 and np.max(r[1]["kappa_exact_hi"]) > 1)

