"""The planner: an analysis report -> a rule plan (one format per layer x KV head x K|V x segment).

Segments (docs/design.md §4): positions t < S are attention sinks; for the current query i, positions
t >= S with i - t < R are the recent window; the rest are "rest". A position that leaves the
window is re-quantized to the rest format. S and R must be on the analysis' rule grid.

Per unit (layer, head, K|V, segment) the usable formats form a *chain*: representable formats
sorted by bits, keeping a format only if it has strictly smaller error (its l2 error model) and,
for keys, no larger Theorem 5.7 term u D^2 than every cheaper kept format. Moving up a chain never
increases any bound.

* Theorem 5.7 (exact rationals): a key format is admissible where eps >= c kappa_hi D_hi^2 u;
  values have kappa = 0, so every value format is. ``thm_min`` is the first admissible chain index.
* The end-to-end bound (``hnfverify.core.bound``) is lowered by one deterministic greedy sequence:
  from a start state, repeatedly take the move (a unit to any higher chain entry) with the
  largest bound reduction per added cache bit. The sequence does not depend on the budget.
* ``--eps``: eps is both Theorem 5.7's tolerance and the budget of every (layer, KV head)'s
  first-order attention-output error E_h (``hnfverify.core.bound``) — which is what limits values,
  whose curvature is 0. Per head, the shortest prefix of that head's own greedy sequence with
  E_h <= eps. ``--eps-target`` adds the end-to-end budget: the shortest prefix of the global
  sequence (from the chain bottoms) with bound <= eps_target. Every unit takes the highest of
  the three formats, so tightening eps can only raise formats.
* ``--avg-bits B``: the longest prefix of the sequence from ``thm_min`` (or the chain bottoms if
  no eps) whose average bits (overhead included) are <= B. Raising B only extends the prefix,
  so the bound never rises.
* ``--avg-bits`` orders its moves by ``--objective`` (docs/design.md §3.1): ``fisher`` (default where the
  report has the measured sensitivities) lowers the measured diagonal-Fisher estimate of the KL divergence,
  the sum over units of each format's actual calibration error weighted by the squared output gradients
  (``planning.sensitivity``); ``linear`` (the default otherwise) lowers the sum over layers
  of the bounds' first-order Taylor terms (sum dV A + (m + M) B weighted by ||W_o|| sqrt(G)) — not a
  bound, a ranking; ``layers`` lowers the sum of the layers' first-order bounds b_l themselves, whose
  exponential key terms are astronomically large at 2-4 bits and starve the values; ``end_to_end``
  lowers e_L, whose weights (products of downstream Lipschitz estimates, ~1e29 for the first layers of
  SmolLM2) pour the bits into early layers. Measured on real text in that order (BENCHMARKS.md,
  ablation). ``--eps-target`` always uses e_L. Whatever the ranking, the plan's bounds are computed
  exactly and certified by ``hnfverify check``.
* ``--uniform SPEC``: fixed formats (the baselines), through the same code path; SPEC is one
  format or per K/V/segment overrides (``parse_uniform``). ``assign``: explicit per-unit formats.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..core.bound import exact_head_error, kl_bound, logit_osc_bound
from ..core.formats import RotatedFormat, ScaledFp8Format, by_name, channel_groups_of, engine_formats, format_table
from ..core.numbers import dec_down, dec_up, fmt_number, parse_number, round_up, show_bound
from ..core.semantics import SEGMENTS
from ..core.vocabulary import Objective
from ..errors import InputError, InvalidArgument, PlanInfeasible
from .assemble import assemble, claim_up, raise_to_theorem
from .modes import Planning, avg_bits_state, eps_state, fixed_channel_groups, fixed_formats, fixed_state
from .request import PlanRequest, parse_uniform, resolved_objective
from .search import FloatHead, GreedySearch, average_bits, norm_overhead
from .units import build_chain, head_inputs, set_errors, theorem_term, units_from_report


def layer_gains(arrays: dict, req: PlanRequest, n_l: int, n_h: int) -> dict:
    """tau, the block and rest-of-block gains (measured and with the margin), ||W_o|| and q_max per layer
    and KV head, as exact numbers rounded up from the report's floats."""
    import numpy as np

    tau = [parse_number(dec_up(float(x))) for x in arrays["scaling"]]
    lips_meas = arrays["lipschitz"]
    if not np.all(np.isfinite(lips_meas)):
        raise InvalidArgument("the report has no Lipschitz estimates (analyzed with --lipschitz-iters 0); "
                              "re-run analyze with the estimate on")
    lips = [round_up(parse_number(dec_up(float(x))) * req.lipschitz_margin) for x in lips_meas]
    if "mlp_lipschitz" not in arrays or not np.all(np.isfinite(arrays["mlp_lipschitz"])):
        raise InvalidArgument("the report has no estimates of the rest-of-block (MLP) gains; re-run analyze")
    mlp_meas = arrays["mlp_lipschitz"]
    mlps = [round_up(parse_number(dec_up(float(x))) * req.lipschitz_margin) for x in mlp_meas]
    onorm = [[parse_number(dec_up(float(arrays["o_proj_norm_kvhead"][li, h]))) for h in range(n_h)]
             for li in range(n_l)]
    qmax = [[parse_number(dec_up(float(arrays["qnorm_max_hi"][li, h].max()))) for h in range(n_h)]
            for li in range(n_l)]
    return {"tau": tau, "lips": lips, "lips_meas": lips_meas, "mlps": mlps, "mlp_meas": mlp_meas,
            "onorm": onorm, "qmax": qmax, "composition": composition_inputs(arrays, req, n_l)}


def composition_inputs(arrays: dict, req: PlanRequest, n_l: int) -> dict:
    """The composition form and, for the suffix form, S_l, K, rho and Gamma: measured, and the values with
    the margin (--suffix-margin for S_l and K; Gamma is computed from the weights, margin 1) — §2.5, §2.6."""
    import numpy as np

    have = "suffix" in arrays and np.all(np.isfinite(arrays["suffix"])) and len(arrays["suffix"]) == n_l
    form = req.composition or ("suffix" if have else "product")
    if form == "product":
        if req.max_kl is not None:
            raise InvalidArgument("--max-kl needs the suffix composition, and the report has no suffix sensitivities "
                                  "(analyzed with --suffix-iters 0); re-run analyze")
        return {"form": "product"}
    if not have:
        raise InvalidArgument("--composition suffix: the report has no suffix sensitivities (analyzed with "
                              "--suffix-iters 0); re-run analyze or plan with --composition product")

    def meas(x):
        return parse_number(dec_up(float(x)))

    s_meas = [meas(x) for x in arrays["suffix"]]
    k_meas, g_meas = meas(arrays["suffix_remainder"][0]), meas(arrays["logit_gain"][0])
    return {"form": "suffix", "suffix_meas": s_meas, "suffix": [round_up(s * req.suffix_margin) for s in s_meas],
            "remainder_meas": k_meas, "remainder": round_up(k_meas * req.suffix_margin),
            "radius": parse_number(dec_down(float(arrays["suffix_radius"][0]))), "logit_gain_meas": g_meas,
            "logit_gain": g_meas, "margin": req.suffix_margin}


def phi_for_kl(max_kl, gain):
    """The largest end-to-end bound Phi whose KL bound (round_up(Gamma Phi))^2 / 8 fits max_kl, rounded down a
    little (the exact check decides)."""
    from fractions import Fraction

    return Fraction(dec_down(math.sqrt(8 * float(max_kl)) / float(gain) * (1 - 1e-12), 12))


def set_chains(units: list, fixed, table: dict, req: PlanRequest, prune=None) -> None:
    """Every unit's chain and its Theorem 5.7 minimum ``thm_min``; PlanInfeasible where none holds. ``prune``:
    a searched plan's replacement of each built chain (``planning.sensitivity.fisher_chains``)."""
    infeasible = []
    for u in units:
        if fixed is not None:
            uf = fixed(u)
            if not uf.representable(u.stats):
                raise PlanInfeasible(f"{uf.name}: layer {u.layer} head {u.head} {u.kv} holds values up to "
                                     f"{float(u.stats.amax):.4g}, beyond the format's range (at most "
                                     f"{float(uf.domain_max):.4g})")
            u.chain = [uf]
            set_errors(u)
            u.thm_min = 0 if (req.eps is None or u.kv == "V" or req.eps >= theorem_term(uf, u, req.c)) else None
            continue
        build_chain(u, table, req.c)
        if prune is not None and u.chain:
            prune(u)
            set_errors(u)
        if not u.chain:
            raise PlanInfeasible(f"layer {u.layer} head {u.head} {u.kv} {u.seg}: no format can represent values "
                                 f"up to {float(u.stats.amax):.4g}")
        if req.eps is None or u.kv == "V":
            u.thm_min = 0
        else:
            u.thm_min = next((i for i, f in enumerate(u.chain) if req.eps >= theorem_term(f, u, req.c)), None)
            if u.thm_min is None:
                infeasible.append(u)
    if infeasible:
        worst = max(infeasible, key=lambda u: theorem_term(u.chain[-1], u, req.c))
        need = theorem_term(worst.chain[-1], worst, req.c)
        raise PlanInfeasible(
            f"Theorem 5.7 cannot hold at --eps {fmt_number(req.eps)}: at {len(infeasible)} of "
            f"{sum(u.kv == 'K' for u in units)} key segments even {worst.chain[-1].name} is too coarse "
            f"(worst: layer {worst.layer} head {worst.head} K {worst.seg}, needs eps >= {show_bound(need)})")


def planning_context(units: list, meta: dict, req: PlanRequest, gains: dict, n_l: int, g_q: int,
                     costs: list | None = None) -> Planning:
    """The per-head exact inputs, the float twins and the two greedy searches the modes share; ``costs``: the
    fisher objective's per-unit prices (``planning.sensitivity.unit_costs``)."""
    by_head: dict = {}
    for u in units:
        by_head.setdefault((u.layer, u.head), []).append(u)
    tau, qmax, onorm, lips, mlps = gains["tau"], gains["qmax"], gains["onorm"], gains["lips"], gains["mlps"]
    exact_heads = {lh: head_inputs(us, tau[lh[0]], qmax[lh[0]][lh[1]]) for lh, us in by_head.items()}
    sg = math.sqrt(g_q)
    weights = {lh: float(onorm[lh[0]][lh[1]]) * sg for lh in by_head}
    amp_f = []
    acc = 1.0
    for li in range(n_l - 1, -1, -1):
        amp_f.append(acc)
        acc *= float(lips[li])
    amp_f = [a * float(m) for a, m in zip(amp_f[::-1], mlps)]      # A_l L'_l (docs/design.md §2.5)
    comp = gains["composition"]
    if comp["form"] == "suffix":
        amp_f = [float(s) for s in comp["suffix"]]                  # first-order weights of the suffix form
    amp_e2e = amp_f
    if req.objective in (Objective.LAYERS, Objective.LINEAR, Objective.FISHER):
        amp_f = [1.0] * n_l
    float_heads = {}
    for lh, us in by_head.items():
        segs = tuple(s for s in SEGMENTS if any(u.seg == s and u.kv == "K" for u in us))
        inputs = exact_heads[lh]
        float_heads[lh] = FloatHead(float(inputs.tau), float(inputs.q_max), segs,
                                    tuple(float(inputs.mass_alpha[s]) for s in segs),
                                    tuple(float(inputs.mass_avo[s]) for s in segs),
                                    tuple(float(inputs.spread[s]) for s in segs))
    kind = {Objective.LINEAR.value: "linear", Objective.FISHER.value: "fisher"}.get(req.objective, "bound")
    search = GreedySearch(units, float_heads, weights, amp_f, objective=kind, costs=costs)
    search_e2e = search if req.objective == Objective.END_TO_END else GreedySearch(units, float_heads, weights, amp_e2e)
    target = req.eps_target
    if req.max_kl is not None:
        phi = phi_for_kl(req.max_kl, comp["logit_gain"])
        target = phi if target is None else min(target, phi)
    return Planning(req, units, meta, by_head, exact_heads, weights, onorm, lips, mlps, g_q, search, search_e2e,
                    amp_e2e, math.sqrt(meta["max_seq_len"]), comp, target)


def search_table(table: dict, group: int, analysis_group: int) -> dict:
    """The formats a searched plan chooses from: channel formats of one group only."""
    if analysis_group % group or group not in channel_groups_of(analysis_group):
        raise InvalidArgument(f"--channel-group {group}: must be one of {channel_groups_of(analysis_group)}, the "
                              f"groups inside the analysis' channel group {analysis_group} (analyze --channel-group)")
    return {n: f for n, f in table.items() if f.granularity != "channel" or f.group == group}


def plan_from_report(summary: dict, arrays: dict, req: PlanRequest, report_name: str = "") -> dict:
    """Build the plan (a JSON-ready dict in canonical form). Raises PlanInfeasible / InvalidArgument."""
    return plan_with_estimate(summary, arrays, req, report_name)[0]


def plan_with_estimate(summary: dict, arrays: dict, req: PlanRequest, report_name: str = "") -> tuple:
    """(plan, the fisher objective's estimate of its KL per token, None for other objectives). With
    ``req.recent`` None (``--recent auto``) the window R of the rule grid with the lowest estimate at the budget
    (docs/design.md §3.1)."""
    req.validate()
    req = replace(req, objective=resolved_objective(req, arrays))
    if req.recent is not None:
        return _plan(summary, arrays, req, report_name)
    if req.avg_bits is None or req.objective != Objective.FISHER.value or req.uniform or req.assign:
        raise InvalidArgument("--recent auto chooses the window by the fisher objective's estimate: it needs "
                              "--avg-bits and a report with the measured sensitivities (--objective fisher)")
    tried, best, errors = [], None, []
    for r in summary["rule_grid"]["windows"]:
        try:
            plan, est = _plan(summary, arrays, replace(req, recent=r), report_name)
        except PlanInfeasible as e:
            errors.append(str(e))
            continue
        tried.append(f"R={r}: {est:.4g}")
        if best is None or est < best[1]:
            best = (plan, est, r)
    if best is None:
        raise PlanInfeasible(f"--recent auto: no window of the grid fits the budget ({errors[0]})")
    plan = best[0]
    plan["mode"]["budget_split"] += (f"; the recent window R = {best[2]} of the rule grid, the lowest estimated KL per "
                                     f"token at this budget ({', '.join(tried)})")
    return plan, best[1]


def scaled_formats(req: PlanRequest) -> dict:
    """The fixed-scale FP8 formats (``fp8_e4m3_s<s>``, vLLM) a fixed plan names: one per scale, so not in any table."""
    names = parse_uniform(req.uniform).values() if req.uniform is not None else [item[4] for item in req.assign]
    out = {}
    for name in names:
        try:
            f = by_name(name)
        except InputError:
            continue                        # reported by fixed_formats, with the table
        if isinstance(f, ScaledFp8Format):
            out[f.name] = f
    return out


def _plan(summary: dict, arrays: dict, req: PlanRequest, report_name: str) -> tuple:
    shape = summary["shape"]
    g_q = shape["query_heads"] // shape["kv_heads"]
    big = summary["analysis"]["channel_group"]
    table = format_table(shape["head_dim"], big)
    if req.uniform is not None or req.assign is not None:
        # fixed plans may name the engines' types too (docs/design.md §2.3d), FP8 with a fixed scale any scale
        table = {**table, **engine_formats(shape["head_dim"]), **scaled_formats(req)}
    fixed = fixed_formats(req, table)
    if fixed is None and req.channel_group == "all":
        # every group inside the analysis' in the table; the diameters are the analysis' group's, which contains
        # each of them (docs/design.md §3)
        groups = {big}
    elif fixed is None:                     # a searched plan: one channel group, the user's or the analysis'
        groups = {req.channel_group or big}
        table = search_table(table, req.channel_group or big, big)
    if fixed is None:                       # the ablations: uniform grids only, no rotation
        table = {n: f for n, f in table.items() if (req.codebooks or f.family != "codebook")
                 and (req.rotation or not isinstance(f, RotatedFormat))}
    else:
        groups = fixed_channel_groups(req)
    # the diameters of the plan's one group where the analysis measured them, else of the analysis' group,
    # which contains every smaller group (docs/design.md §3)
    group = groups.pop() if len(groups) == 1 else big
    if group != big and f"k_d_channel_g{group}" not in arrays:
        group = big
    units, meta = units_from_report(summary, arrays, req, table, group)
    for i, u in enumerate(units):
        u.idx = i
    n_l, n_h = shape["layers"], shape["kv_heads"]
    gains = layer_gains(arrays, req, n_l, n_h)
    prune = None
    if fixed is None and req.objective == Objective.FISHER.value:
        from .sensitivity import fisher_chains

        rechain = fisher_chains(summary, arrays, table, req.eps is not None)
        prune = lambda u: rechain(u, req.c)         # noqa: E731
    set_chains(units, fixed, table, req, prune)
    costs = None
    if fixed is None and req.objective == Objective.FISHER.value:
        from .sensitivity import unit_costs

        costs = unit_costs(units, summary, arrays)
    ctx = planning_context(units, meta, req, gains, n_l, g_q, costs)
    theorem_minima = [u.thm_min for u in units]
    if fixed is not None:
        state, mode = fixed_state(ctx)
    elif req.avg_bits is not None:
        state, mode = avg_bits_state(ctx, theorem_minima)
    else:
        state, mode = eps_state(ctx, theorem_minima)

    if fixed is None:
        state = raise_to_theorem(units, state, req)
        ov = norm_overhead(req, meta["head_dim"])
        if req.avg_bits is not None and average_bits(units, state, ov) > req.avg_bits:
            raise PlanInfeasible(f"--avg-bits {fmt_number(req.avg_bits)}: Theorem 5.7 at --eps {fmt_number(req.eps)} "
                                 f"for the re-quantized forms needs {float(average_bits(units, state, ov)):.4f} bits")
    layer_b, e_l = ctx.exact_bound(state)
    head_err = [[exact_head_error(ctx.exact_heads[(li, h)],
                                  {u.seg: u.chain[state[u.idx]] for u in ctx.by_head[(li, h)] if u.kv == "K"},
                                  {u.seg: u.chain[state[u.idx]] for u in ctx.by_head[(li, h)] if u.kv == "V"})
                 for h in range(n_h)] for li in range(n_l)]
    if req.avg_bits is not None and req.eps_target is not None and e_l > req.eps_target:
        raise PlanInfeasible(f"at --avg-bits {fmt_number(req.avg_bits)} the end-to-end bound is "
                             f"{show_bound(e_l)} > --eps-target {fmt_number(req.eps_target)}")
    comp = gains["composition"]
    z = logit_osc_bound(e_l, comp["logit_gain"]) if comp["form"] == "suffix" else math.inf
    kl = kl_bound(z)
    if req.max_kl is not None and kl > req.max_kl:
        raise PlanInfeasible(f"the certified KL bound of this plan is {show_bound(kl)} > --max-kl "
                             f"{fmt_number(req.max_kl)} (end-to-end bound {show_bound(e_l)})")
    plan = assemble(summary, req, units, state, meta, table, gains["tau"], gains["lips"], gains["lips_meas"],
                    gains["mlps"], gains["mlp_meas"], gains["onorm"], gains["qmax"], layer_b, e_l, mode, report_name,
                    gains["composition"])
    plan["claims"]["attention_error_max"] = [claim_up(max(row)) for row in head_err]
    plan["claims"]["logit_bound"] = claim_up(z)
    plan["claims"]["kl_bound"] = claim_up(kl)
    estimate = None
    if costs is not None:
        estimate = sum(costs[i][state[i]] for i in range(len(units))) / summary["analysis"]["fisher"]["tokens"]
    return plan, estimate
