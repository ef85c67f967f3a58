"""One function per planning mode: each returns the chain index of every unit and the plan's ``mode``.

* fixed formats (``--uniform``, ``assign``): the formats given, checked against the format table;
* ``--avg-bits B``: the longest prefix of the greedy sequence whose average bits are <= B;
* ``--eps`` (and ``--eps-target``): per (layer, KV head) the shortest prefix of its own greedy sequence
  with E_h <= eps, then the shortest global prefix with e_L <= eps_target; each unit takes the highest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.bound import exact_end_to_end, exact_head_error, exact_layer_bound, suffix_end_to_end
from ..core.formats import by_name
from ..core.numbers import fmt_number, show_bound
from ..errors import InvalidArgument, PlanInfeasible
from .request import PlanRequest, parse_uniform, uniform_format
from .search import GreedySearch, average_bits, norm_overhead


@dataclass
class Planning:
    """What the modes share: the units, their per-head exact inputs and weights, the layers' gains and
    the two greedy searches (the objective's and the end-to-end one)."""

    req: PlanRequest
    units: list
    meta: dict
    by_head: dict              # (layer, head) -> [Unit]
    exact_heads: dict          # (layer, head) -> HeadInputs
    weights: dict              # (layer, head) -> o_norm sqrt(G) (float)
    onorm: list
    lipschitz: list
    mlp_gains: list
    query_group: int
    search: GreedySearch
    search_end_to_end: GreedySearch
    amplification_end_to_end: list
    sqrt_t: float
    composition: dict          # form, suffix (S_l values), remainder, radius, logit_gain (docs/design.md §2.5)
    e2e_target: object = None  # the end-to-end budget: eps_target, and with --max-kl the Phi it allows (§2.6)

    def exact_bound(self, state):
        """(per-layer bounds, e_L) of the plan that gives unit i the format ``chain[state[i]]``."""
        layer_b = []
        n_l = len(self.onorm)
        for li in range(n_l):
            errs = []
            for h in range(len(self.onorm[li])):
                us = self.by_head[(li, h)]
                fk = {u.seg: u.chain[state[u.idx]] for u in us if u.kv == "K"}
                fv = {u.seg: u.chain[state[u.idx]] for u in us if u.kv == "V"}
                errs.append(exact_head_error(self.exact_heads[(li, h)], fk, fv))
            layer_b.append(exact_layer_bound(errs, self.onorm[li], self.query_group))
        comp = self.composition
        if comp["form"] == "suffix":
            return layer_b, suffix_end_to_end(layer_b, comp["suffix"], self.meta["max_seq_len"], comp["remainder"],
                                              comp["radius"])
        return layer_b, exact_end_to_end(layer_b, self.lipschitz, self.meta["max_seq_len"], self.mlp_gains)

    def float_bound(self, state) -> float:
        return self.sqrt_t * sum(self.amplification_end_to_end[lh[0]] * self.weights[lh]
                                 * self.search_end_to_end.head_error(lh, state) for lh in self.by_head)


def fixed_channel_groups(req: PlanRequest) -> set:
    """The channel groups of the formats a ``--uniform`` / ``assign`` plan names."""
    names = parse_uniform(req.uniform).values() if req.uniform is not None else [item[4] for item in req.assign]
    return {f.group for f in map(by_name, names) if f.granularity == "channel"}


def fixed_formats(req: PlanRequest, table: dict):
    """unit -> its format for ``--uniform`` / ``assign`` plans (None for searched plans)."""
    if req.uniform is not None:
        sel = parse_uniform(req.uniform)
        for key, name in sel.items():
            f = by_name(name)
            if f.name not in table:
                raise InvalidArgument(f"--uniform {name!r} is not in this model's format table: {sorted(table)}")
            if f.granularity == "channel" and not (key == "rest" or key.endswith(".rest")):
                raise InvalidArgument(f"--uniform {f.name}: channel-grouped formats cannot hold the sink or the recent "
                                      "window (tokens arrive one at a time); use a per-token or float format, or "
                                      f"give it for the rest only ({'K.rest' if key in ('*', 'K') else key}={f.name})")

        def uniform(u):
            return table[by_name(uniform_format(sel, u.kv, u.seg)).name]
        return uniform
    if req.assign is not None:
        given = {}
        for item in req.assign:
            layer, head, kv, seg, name = item
            if name not in table:
                raise InvalidArgument(f"assign: {name!r} is not in this model's format table: {sorted(table)}")
            given[(int(layer), int(head), kv, seg)] = table[name]

        def assigned(u):
            try:
                f = given[(u.layer, u.head, u.kv, u.seg)]
            except KeyError:
                raise InvalidArgument(f"assign: no format for layer {u.layer} head {u.head} {u.kv} {u.seg}") from None
            if f.granularity == "channel" and u.seg != "rest":
                raise InvalidArgument(f"assign: channel-grouped {f.name} for {u.seg} (rest only)")
            return f
        return assigned
    return None


def fixed_state(ctx: Planning):
    """``--uniform`` / ``assign``: every chain holds the one given format."""
    req = ctx.req
    if req.uniform is not None:
        return [0] * len(ctx.units), {"kind": "uniform", "value": req.uniform}
    return [0] * len(ctx.units), {"kind": "assigned", "value": f"{len(req.assign)} units"}


def avg_bits_state(ctx: Planning, start: list):
    """``--avg-bits``: the longest prefix of the objective's greedy sequence from ``start`` (the Theorem
    5.7 minima) whose average bits are <= the budget."""
    req, units = ctx.req, ctx.units
    ov = norm_overhead(req, ctx.meta["head_dim"])
    if average_bits(units, start, ov) > req.avg_bits:
        raise PlanInfeasible(f"--avg-bits {fmt_number(req.avg_bits)} is below the cheapest plan allowed "
                             f"({'by Theorem 5.7 at --eps ' + fmt_number(req.eps) if req.eps else 'by the formats'}"
                             f"{', error norms included' if ov else ''}): "
                             f"{float(average_bits(units, start, ov)):.4f} bits per element")
    state = list(start)
    for i, j in ctx.search.sequence(start):
        old = state[i]
        state[i] = j
        if average_bits(units, state, ov) > req.avg_bits:
            state[i] = old
            break
    return state, {"kind": "avg_bits", "value": fmt_number(req.avg_bits)}


def eps_state(ctx: Planning, theorem_minima: list):
    """``--eps`` (with ``--eps-target``): the Theorem 5.7 minima, raised until every head's E_h <= eps
    and, with a target, e_L <= eps_target."""
    req, units = ctx.req, ctx.units
    search = ctx.search_end_to_end
    bottom = [0] * len(units)
    # every (layer, head)'s certified E_h must be <= eps (this is what limits values, kappa = 0): per head,
    # the shortest prefix of the objective's greedy sequence (its ranking; `linear` by default, which plans
    # better than the bound's own plateaus, BENCHMARKS.md) whose exact E_h is <= eps
    head_budget = list(bottom)
    for lh, us in ctx.by_head.items():
        moves = ctx.search.head_sequence(lh, bottom)
        state = list(bottom)
        k = 0
        while True:
            fk = {u.seg: u.chain[state[u.idx]] for u in us if u.kv == "K"}
            fv = {u.seg: u.chain[state[u.idx]] for u in us if u.kv == "V"}
            if search.head_error(lh, state) <= float(req.eps) * (1 - 1e-9) or k >= len(moves):
                e_exact = exact_head_error(ctx.exact_heads[lh], fk, fv)
                if e_exact <= req.eps:
                    break
                if k >= len(moves):
                    raise PlanInfeasible(
                        f"--eps {fmt_number(req.eps)}: the attention-output error bound of layer {lh[0]} "
                        f"KV head {lh[1]} is at least {show_bound(e_exact)} with the finest formats")
            i, j = moves[k]
            state[i] = j
            k += 1
        for u in us:
            head_budget[u.idx] = state[u.idx]
    thm = [max(a, b) for a, b in zip(theorem_minima, head_budget)]
    state = list(thm)
    if ctx.e2e_target is not None:
        budget = list(bottom)
        moves = search.sequence(bottom)
        k = 0
        while True:
            final = [max(a, b) for a, b in zip(thm, budget)]
            if ctx.float_bound(budget) <= float(ctx.e2e_target) * (1 - 1e-9) or k >= len(moves):
                if ctx.exact_bound(final)[1] <= ctx.e2e_target:
                    break
                if k >= len(moves):
                    what = (f"--eps-target {fmt_number(req.eps_target)}" if req.eps_target == ctx.e2e_target else
                            f"--max-kl {fmt_number(req.max_kl)} (end-to-end bound <= {show_bound(ctx.e2e_target)})")
                    raise PlanInfeasible(f"{what} is below the smallest end-to-end bound these formats reach: "
                                         f"{show_bound(ctx.exact_bound(final)[1])}")
            i, j = moves[k]
            budget[i] = j
            k += 1
        state = final
    return state, {"kind": "eps", "value": fmt_number(req.eps)}
