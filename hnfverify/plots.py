"""Figures (matplotlib, Agg; PNG written to a temp file, then renamed): the plan heatmap, the
bound-vs-actual scatter, the Pareto plot of KLD against bits per element. No torch here."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidArgument

GROUP_STYLE = {"peer": ("tab:gray", "s"), "hnfverify": ("tab:blue", "o"), "ablation": ("tab:orange", "^")}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise InvalidArgument("plots need matplotlib: pip install 'hnfverify[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})
    os.replace(tmp, path)
    return str(path)


def plan_bits_grid(plan: dict, buckets: int = 32):
    """(K, V) arrays [layer, bucket]: bits per element (overhead included) of the formats holding each
    position at max_seq_len, averaged over KV heads and the bucket's positions."""
    import numpy as np

    from .core.formats import by_name

    t = plan["max_seq_len"]
    n_l = len(plan["layers"])
    buckets = max(1, min(buckets, t))
    edges = np.linspace(0, t, buckets + 1).astype(int)
    out = {}
    for kv in ("K", "V"):
        g = np.zeros((n_l, buckets))
        for li, layer in enumerate(plan["layers"]):
            per_pos = np.zeros(t)
            for head in layer["heads"]:
                r = head[kv]
                s = min(r["sink"]["length"], t)
                rec = min(r["recent"]["length"], max(0, t - s))
                b = np.empty(t)
                b[:s] = float(by_name(r["sink"]["format"]).bits_per_element)
                b[s:t - rec] = float(by_name(r["rest"]["format"]).bits_per_element)
                b[t - rec:] = float(by_name(r["recent"]["format"]).bits_per_element)
                per_pos += b
            per_pos /= len(layer["heads"])
            g[li] = [per_pos[a:b].mean() for a, b in zip(edges[:-1], edges[1:])]
        out[kv] = g
    return out["K"], out["V"], edges


def heatmap(plan: dict, path, title: str = "") -> str:
    plt = _plt()
    k, v, edges = plan_bits_grid(plan)
    vmax = max(k.max(), v.max())
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    for ax, g, name in ((axes[0], k, "keys"), (axes[1], v, "values")):
        im = ax.imshow(g, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                       extent=(0, plan["max_seq_len"], -0.5, g.shape[0] - 0.5))
        ax.set_xlabel("cached position at max_seq_len (recent window: right end)")
        ax.set_title(f"{name}: bits/element (mean over KV heads)")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.85, label="bits per element, overhead included")
    fig.suptitle(title or f"plan {plan['mode']['kind']} {plan['mode']['value']}: "
                 f"{float(__import__('fractions').Fraction(plan['claims']['avg_bits'])):.2f} bits/element")
    return _save(fig, path)


def bound_scatter(points: list, path, title: str = "") -> str:
    """points: [(label, bound, actual)] per (layer, KV head): certified E_h vs the largest observed
    attention-output error."""
    plt = _plt()
    import math

    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    labels = sorted({p[0] for p in points})
    for i, lab in enumerate(labels):
        xs = [p[2] for p in points if p[0] == lab and p[2] > 0 and math.isfinite(p[1])]
        ys = [p[1] for p in points if p[0] == lab and p[2] > 0 and math.isfinite(p[1])]
        ax.scatter(xs, ys, s=14, alpha=0.75, label=lab)
    xs_all = [p[2] for p in points if p[2] > 0 and math.isfinite(p[1])]
    if xs_all:
        lo, hi = min(xs_all) / 2, max(xs_all) * 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="bound = actual")
        ax.set_xlim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("largest observed attention-output error ||o~ - o|| (eval text)")
    ax.set_ylabel("certified first-order bound E_h")
    ax.set_title(title or "certified bound vs actual error, per (layer, KV head)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto(rows: list, path, corpus: str, title: str = "") -> str:
    """rows: bench rows (benchmarks/quality.py). KLD (log) against bits/element, one marker per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        e = r["eval"][corpus]
        color, marker = GROUP_STYLE.get(r["group"], ("k", "x"))
        x = e.get("bits_per_element_decode_mean", e["bits_per_element"])
        ax.scatter(x, max(e["kld"], 1e-6), c=color, marker=marker, s=40)
        ax.annotate(r["method"], (x, max(e["kld"], 1e-6)), fontsize=7, xytext=(4, 2), textcoords="offset points")
    for g, (color, marker) in GROUP_STYLE.items():
        ax.scatter([], [], c=color, marker=marker, label=g)
    ax.set_yscale("log")
    ax.set_xlabel("bits per element of the packed cache while decoding (scales, zero-points, FP residual included)")
    ax.set_ylabel(f"KL divergence to the full-precision cache ({corpus}, eval split)")
    ax.set_title(title or f"SmolLM2-135M-Instruct, {corpus}: lower-left is better")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)
