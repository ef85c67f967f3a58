"""The measured sensitivities of the report (``hnfverify.analysis.sensitivity``) priced per planning unit:
the diagonal-Fisher estimate of the KL divergence each chain format of a unit would add (docs/design.md
§3.1). ``--objective fisher`` ranks the greedy moves by it; no bound depends on it."""

from __future__ import annotations

from ..errors import InvalidArgument

REGIONS = ("sink", "recent", "rest")


def pricer(summary: dict, arrays: dict):
    """price(unit, format name): the estimated KL (summed over a calibration window's tokens) of storing the unit's
    segment in that format, None where the report does not price the format. Raises InvalidArgument where the
    report has no sensitivities or none for the unit's rule."""
    meta = (summary.get("analysis") or {}).get("fisher")
    cost = arrays.get("fisher")
    if not isinstance(meta, dict) or cost is None:
        raise InvalidArgument("--objective fisher: the report has no measured sensitivities; re-run analyze "
                              "with --fisher-tokens > 0")
    names, windows, ivs, tokens = meta["formats"], meta["windows"], meta["intervals"], meta["tokens"]
    index = {n: i for i, n in enumerate(names)}

    def price(u, name: str) -> float | None:
        if u.recent not in windows:
            raise InvalidArgument(f"--objective fisher: the sensitivities were measured for windows {windows}, "
                                  f"not --recent {u.recent}")
        if name not in index:
            return None
        if u.seg == "sink":
            js = [j for j, (lo, hi) in enumerate(ivs) if (tokens if hi is None else hi) <= u.sink]
        else:
            js = [j for j, (lo, hi) in enumerate(ivs) if lo >= u.sink]
        return float(cost[u.layer, u.head, 0 if u.kv == "K" else 1, REGIONS.index(u.seg), windows.index(u.recent),
                          index[name]][js].sum())
    return price


def unit_costs(units: list, summary: dict, arrays: dict) -> list:
    """Per unit, per chain entry: the estimated KL of storing the unit's segment in that format (``pricer``)."""
    price = pricer(summary, arrays)
    out = []
    for u in units:
        row = [price(u, f.name) for f in u.chain]
        if None in row:
            raise InvalidArgument(f"--objective fisher: the report does not price format {u.chain[row.index(None)].name}")
        out.append(row)
    return out


#: the largest measured attention change (mean TV of the weights over the calibration queries) of a key format
#: the fisher objective uses: beyond it the format moves most of the attention mass, outside the regime of a
#: second-order estimate (docs/design.md §3.1)
MAX_KEY_TV = 0.5
#: a format whose joint measurement (every unit of the kind in it, docs/design.md §3.1) costs more KL per token
#: than this breaks the model where it is used everywhere: outside the second-order regime, so out of the chains
MAX_JOINT_KL = 1.0


def fisher_chains(summary: dict, arrays: dict, table: dict, eps_bound: bool):
    """The fisher objective's chains (docs/design.md §3.1): rechain(unit) replaces the unit's chain, built by
    (bits, certified error), with the formats that are cheapest in *estimated* KL for their bits — sorted by bits,
    each kept iff its price is below every cheaper format's — so a codebook that errs more in the worst case
    but less on the data can be chosen. Left out: key formats whose measured attention change exceeds
    MAX_KEY_TV, formats whose joint measurement exceeds MAX_JOINT_KL, and formats the report does not price. ``eps_bound``: Theorem 5.7 constrains the plan, so a
    key chain's theorem terms must not grow (the planner's first admissible entry is then a threshold). The
    chain's finest format (the certified chain's last) always stays last."""
    from .units import theorem_term, unit_bits

    price = pricer(summary, arrays)
    tv = arrays.get("fisher_key_tv")
    joint_kl = arrays.get("fisher_joint_kl")
    index = {n: i for i, n in enumerate(summary["analysis"]["fisher"]["formats"])}

    def rechain(u, c) -> None:
        finest = u.chain[-1]
        cands = []
        for f in table.values():
            if f is finest or not f.representable(u.stats) or (f.granularity == "channel" and u.seg != "rest"):
                continue
            if u.kv == "K" and tv is not None and f.name in index and tv[u.layer, u.head, index[f.name]] > MAX_KEY_TV:
                continue
            if (joint_kl is not None and f.name in index
                    and joint_kl[0 if u.kv == "K" else 1, index[f.name]] > MAX_JOINT_KL):
                continue                        # NaN (not measured) compares False
            pr = price(u, f.name)
            if pr is not None:
                cands.append((unit_bits(u, f), pr, f.name, f))
        fin_pr = price(u, finest.name)
        fin_th = theorem_term(finest, u, c) if eps_bound and u.kv == "K" else 0
        chain, best, best_th = [], None, None
        for bits, pr, _, f in sorted(cands):
            if bits >= unit_bits(u, finest) or (fin_pr is not None and best is not None and best <= fin_pr):
                break                           # the finest's bits, or an entry already as good as the finest
            th = theorem_term(f, u, c) if eps_bound and u.kv == "K" else 0
            if th < fin_th:                     # the terms must fall along the chain down to the finest's
                continue
            if best is None or (pr < best and th <= best_th):
                chain.append(f)
                best, best_th = pr, th
        u.chain = chain + [finest]
    return rechain
