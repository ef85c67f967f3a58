"""The measured sensitivities of the report (``hnfverify.analysis.sensitivity``) priced per planning unit:
the diagonal-Fisher estimate of the KL divergence each chain format of a unit would add (docs/design.md
§3.1). ``--objective fisher`` ranks the greedy moves by it; no bound depends on it."""

from __future__ import annotations

from ..errors import InvalidArgument

REGIONS = ("sink", "recent", "rest")


def unit_costs(units: list, summary: dict, arrays: dict) -> list:
    """Per unit, per chain entry: the estimated KL (summed over a calibration window's tokens) of storing the
    unit's segment in that format. Raises InvalidArgument where the report does not price a unit's rule."""
    meta = (summary.get("analysis") or {}).get("fisher")
    cost = arrays.get("fisher")
    if not isinstance(meta, dict) or cost is None:
        raise InvalidArgument("--objective fisher: the report has no measured sensitivities; re-run analyze "
                              "with --fisher-tokens > 0")
    names, windows, ivs, tokens = meta["formats"], meta["windows"], meta["intervals"], meta["tokens"]
    index = {n: i for i, n in enumerate(names)}
    out = []
    for u in units:
        if u.recent not in windows:
            raise InvalidArgument(f"--objective fisher: the sensitivities were measured for windows {windows}, "
                                  f"not --recent {u.recent}")
        ri = windows.index(u.recent)
        if u.seg == "sink":
            js = [j for j, (lo, hi) in enumerate(ivs) if (tokens if hi is None else hi) <= u.sink]
        else:
            js = [j for j, (lo, hi) in enumerate(ivs) if lo >= u.sink]
        row = []
        for f in u.chain:
            if f.name not in index:
                raise InvalidArgument(f"--objective fisher: the report does not price format {f.name}")
            row.append(float(cost[u.layer, u.head, 0 if u.kv == "K" else 1, REGIONS.index(u.seg), ri,
                                  index[f.name]][js].sum()))
        out.append(row)
    return out


#: the largest measured attention change (mean TV of the weights over the calibration queries) of a key format
#: the fisher objective uses: beyond it the format moves most of the attention mass, outside the regime of a
#: second-order estimate (docs/design.md §3.1)
MAX_KEY_TV = 0.5


def key_pruner(summary: dict, arrays: dict):
    """The fisher objective's chain filter: it leaves out of a key unit's chain the formats whose measured
    attention change exceeds MAX_KEY_TV (the finest format always stays); None where nothing was measured."""
    tv = arrays.get("fisher_key_tv")
    if tv is None:
        return None
    index = {n: i for i, n in enumerate(summary["analysis"]["fisher"]["formats"])}

    def prune(u) -> None:
        if u.kv == "K":
            u.chain = [f for f in u.chain[:-1] if f.name not in index
                       or tv[u.layer, u.head, index[f.name]] <= MAX_KEY_TV] + u.chain[-1:]
    return prune
