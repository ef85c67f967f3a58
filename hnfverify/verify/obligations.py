"""Enumerate and decide every obligation of a plan. Nothing the plan *claims* is trusted: all
numbers are recomputed from the plan's inputs and the formats' definitions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction

from ..bound import (SEGMENTS, HeadInputs, amplification, exact_end_to_end, exact_head_error, exact_layer_bound,
                     segment_errors)
from ..formats import SegmentStats, by_name, format_table
from ..numbers import fmt_number, parse_number, sqrt_up
from . import PROVED, REFUTED, UNKNOWN
from .precision import decide, up
from .smt import composition_query, monotonicity_lemma, precision_query, run_queries


@dataclass
class Obligation:
    id: str
    family: str                 # precision-lower-bound | attention-error-budget | composition-law | lemma
    location: dict
    verdict: str = UNKNOWN
    witness: dict = field(default_factory=dict)
    smt: str | None = None
    reason: str = ""

    def to_json(self) -> dict:
        d = {"id": self.id, "family": self.family, "location": self.location, "verdict": self.verdict,
             "witness": self.witness}
        if self.smt is not None:
            d["smt2"] = self.smt
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class CheckOptions:
    solver: str = "z3"
    timeout_ms: int = 10000          # per query, inside the solver
    wall_timeout_s: float = 300.0    # hard limit for the whole solver worker
    smt: bool = True                 # False: exact decisions only (no solver)
    smt_per_position: bool = False   # audits: one SMT query per cached position (small plans only)


@dataclass
class CheckResult:
    obligations: list
    entries: int
    entries_exact: int
    timings: dict
    end_to_end_bound: Fraction
    layer_bounds: list

    def verdict(self) -> str:
        vs = {o.verdict for o in self.obligations}
        if REFUTED in vs:
            return REFUTED
        if UNKNOWN in vs or not self.obligations:
            return UNKNOWN
        return PROVED


def _seg_stats(inputs: dict, d: int) -> SegmentStats:
    return SegmentStats(d, parse_number(inputs["d_token"][1]), parse_number(inputs["d_channel"][1]),
                        parse_number(inputs["amax"][1]))


def _groups(plan: dict):
    """Yield (layer, head, kv, segment-or-block id, positions [start, end) list, format, inputs)."""
    t = plan["max_seq_len"]
    for layer in plan["layers"]:
        for head in layer["heads"]:
            for kv in ("K", "V"):
                rule = head[kv]
                s_len, r_len = rule["sink"]["length"], rule["recent"]["length"]
                rest_len = max(0, t - s_len - r_len)
                blocks = rule["blocks"]
                covered = [(b["start"], b["end"]) for b in blocks]

                def minus(a, b):
                    """[a, b) without the blocks, as a list of ranges."""
                    out, cur = [], a
                    for s, e in covered:
                        if e <= cur or s >= b:
                            continue
                        if s > cur:
                            out.append((cur, s))
                        cur = max(cur, e)
                    if cur < b:
                        out.append((cur, b))
                    return out

                lens = {"sink": s_len, "recent": r_len, "rest": rest_len}
                spans = {"sink": (0, min(s_len, t)), "recent": (min(s_len, t), t), "rest": (min(s_len, t), t)}
                for seg in SEGMENTS:
                    if lens[seg] == 0:
                        continue
                    rng = minus(*spans[seg])
                    if rng:
                        yield layer["layer"], head["kv_head"], kv, seg, rng, rule[seg]["format"], rule[seg]["inputs"]
                for bi, b in enumerate(blocks):
                    yield layer["layer"], head["kv_head"], kv, f"block{bi}", [(b["start"], b["end"])], b["format"], \
                        b["inputs"]


def check_plan(plan: dict, options: CheckOptions = CheckOptions()) -> CheckResult:
    import numpy as np

    t0 = time.perf_counter()
    eps, c = parse_number(plan["eps"]), parse_number(plan["c"])
    d = plan["shape"]["head_dim"]
    fmts = {n: by_name(n) for n in plan["formats"]}
    obligations: list[Obligation] = []

    # ---- (a) Theorem 5.7 at every position: expand groups to per-position arrays, filter, fall back
    groups = list(_groups(plan))
    g_exact, g_counts = [], []
    for (_, _, kv, seg, rng, fname, inputs) in groups:
        f = fmts[fname]
        st = _seg_stats(inputs, d)
        kap = parse_number(inputs["kappa"][1]) if kv == "K" else Fraction(0)
        g_exact.append((kap, f.theorem_diameter(st), f.u))
        g_counts.append(sum(e - s for s, e in rng))
    counts = np.array(g_counts, dtype=np.int64)
    k_arr = np.repeat(np.array([up(x[0]) for x in g_exact]), counts)
    d_arr = np.repeat(np.array([up(x[1]) for x in g_exact]), counts)
    u_arr = np.repeat(np.array([up(x[2]) for x in g_exact]), counts)
    owner = np.repeat(np.arange(len(groups)), counts)
    memo: dict = {}

    def exact_at(i):
        g = int(owner[i])
        if g not in memo:
            memo[g] = g_exact[g]
        return memo[g]

    t1 = time.perf_counter()
    res = decide(eps, c, k_arr, d_arr, u_arr, exact=exact_at)
    t2 = time.perf_counter()
    starts = np.concatenate([[0], np.cumsum(counts)])
    smt_jobs = []
    for gi, (layer, head, kv, seg, rng, fname, inputs) in enumerate(groups):
        a, b = starts[gi], starts[gi + 1]
        kap, diam, u = g_exact[gi]
        rhs = c * kap * diam * diam * u
        loc = {"layer": layer, "kv_head": head, "kv": kv, "segment": seg,
               "positions": [[s, e] for s, e in rng]}
        ob = Obligation(f"precision/L{layer}/H{head}/{kv}/{seg}", "precision-lower-bound", loc)
        ob.witness = {"eps": fmt_number(eps), "c": fmt_number(c), "kappa_hi": fmt_number(kap),
                      "D_hi": fmt_number(diam), "u": fmt_number(u), "format": fname,
                      "rhs": fmt_number(rhs), "granularity": fmts[fname].granularity}
        if res.refuted[a:b].any():
            first = int(np.flatnonzero(res.refuted[a:b])[0])
            pos = _nth_position(rng, first)
            ob.verdict = REFUTED
            ob.witness["first_violation_position"] = pos
            ob.witness["violations"] = int(res.refuted[a:b].sum())
            ob.witness["cheapest_admissible"] = _cheapest_admissible(eps, c, kap, inputs, d, kv, plan)
        elif res.proved[a:b].all():
            ob.verdict = PROVED
            if kv == "K" and options.smt:
                ob.smt = precision_query(eps, c, kap, diam, u, ob.id, options.timeout_ms)
                smt_jobs.append(ob)
        obligations.append(ob)

    # ---- (b) first-order attention-output error per (layer, head) and (c) the composition law
    n_l = plan["shape"]["layers"]
    g_q = plan["shape"]["query_heads"] // plan["shape"]["kv_heads"]
    layer_bounds, lips = [], []
    for layer in plan["layers"]:
        tau = parse_number(layer["tau"])
        errs, norms = [], []
        for head in layer["heads"]:
            hi = _head_inputs(head, tau, d, plan["max_seq_len"])
            fk = {s: fmts[head["K"][s]["format"]] for s in hi.k}
            fv = {s: fmts[head["V"][s]["format"]] for s in hi.v}
            fk, fv = _with_blocks(head, fk, fv, fmts, hi)
            e_h = exact_head_error(hi, fk, fv)
            errs.append(e_h)
            norms.append(parse_number(head["o_proj_norm"]))
            if plan["mode"]["kind"] == "eps":
                ob = Obligation(f"attention/L{layer['layer']}/H{head['kv_head']}", "attention-error-budget",
                                {"layer": layer["layer"], "kv_head": head["kv_head"]})
                dk, dv = segment_errors(hi.k, fk), segment_errors(hi.v, fv)
                ob.witness = {"eps": fmt_number(eps), "error_bound": fmt_number(e_h),
                              "dK": {s: fmt_number(x) for s, x in dk.items()},
                              "dV": {s: fmt_number(x) for s, x in dv.items()}}
                ob.verdict = PROVED if e_h <= eps else REFUTED
                obligations.append(ob)
        layer_bounds.append(exact_layer_bound(errs, norms, g_q))
        lips.append(parse_number(layer["lipschitz"]["value"]))
    e_l = exact_end_to_end(layer_bounds, lips, plan["max_seq_len"])
    if plan["eps_target"] is not None:
        target = parse_number(plan["eps_target"])
        sqrt_t = sqrt_up(Fraction(plan["max_seq_len"]))
        ob = Obligation("composition", "composition-law", {"layers": n_l})
        ob.witness = {"eps_target": fmt_number(target), "end_to_end_bound": fmt_number(e_l),
                      "sqrt_T": fmt_number(sqrt_t), "layer_bounds": [fmt_number(b) for b in layer_bounds],
                      "lipschitz": [fmt_number(x) for x in lips],
                      "amplification": [fmt_number(x) for x in amplification(lips)]}
        ob.verdict = PROVED if e_l <= target else REFUTED
        if ob.verdict == PROVED and options.smt:
            ob.smt = composition_query(layer_bounds, lips, sqrt_t, target, options.timeout_ms)
            smt_jobs.append(ob)
        obligations.append(ob)
    if options.smt:
        lemma = Obligation("lemma/monotonicity", "lemma", {})
        lemma.smt = monotonicity_lemma(options.timeout_ms)
        lemma.verdict = PROVED
        smt_jobs.insert(0, lemma)
        obligations.insert(0, lemma)
        if options.smt_per_position:
            smt_jobs += _per_position_jobs(obligations, options)

    # ---- the solver must agree with every exact PROVED decision; anything else fails closed
    t3 = time.perf_counter()
    answers = run_queries([o.smt for o in smt_jobs], options.solver, options.timeout_ms, options.wall_timeout_s)
    for ob, ans in zip(smt_jobs, answers):
        if ans["result"] == "unsat":
            continue
        if ans["result"] == "sat":
            ob.verdict = UNKNOWN
            ob.reason = f"{options.solver} found the negation satisfiable, disagreeing with the exact decision"
        else:
            ob.verdict = UNKNOWN
            ob.reason = f"{options.solver}: {ans.get('reason') or 'unknown'}"
    t4 = time.perf_counter()
    timings = {"expand_s": t1 - t0, "filter_s": t2 - t1, "bounds_s": t3 - t2, "smt_s": t4 - t3}
    return CheckResult(obligations, int(counts.sum()), res.exact_calls, timings, e_l, layer_bounds)


def _per_position_jobs(obligations, options) -> list:
    jobs = []
    for ob in list(obligations):
        if ob.family != "precision-lower-bound" or ob.verdict != PROVED or ob.location["kv"] != "K":
            continue
        w = ob.witness
        for s, e in ob.location["positions"]:
            for pos in range(s, e):
                o = Obligation(f"{ob.id}/t{pos}", "precision-lower-bound-position", dict(ob.location, positions=[[pos, pos + 1]]))
                o.verdict = PROVED
                o.smt = precision_query(parse_number(w["eps"]), parse_number(w["c"]), parse_number(w["kappa_hi"]),
                                        parse_number(w["D_hi"]), parse_number(w["u"]), o.id, options.timeout_ms)
                jobs.append(o)
                obligations.append(o)
    return jobs


def _nth_position(rng, n):
    for s, e in rng:
        if n < e - s:
            return s + n
        n -= e - s
    return None


def _cheapest_admissible(eps, c, kap, inputs, d, kv, plan):
    st = _seg_stats(inputs, d)
    table = format_table(d, plan["analysis"]["channel_group"])
    ok = [f for f in table.values() if f.representable(st) and eps >= c * kap * f.theorem_diameter(st) ** 2 * f.u]
    if not ok:
        return None
    return min(ok, key=lambda f: (f.bits_per_element, f.name)).name


def _head_inputs(head, tau, d, t) -> HeadInputs:
    k, v, ma, mv = {}, {}, {}, {}
    s_len, r_len = head["K"]["sink"]["length"], head["K"]["recent"]["length"]
    lens = {"sink": s_len, "recent": r_len, "rest": max(0, t - s_len - r_len)}
    for seg in SEGMENTS:
        if lens[seg] == 0:
            continue
        k[seg] = _seg_stats(head["K"][seg]["inputs"], d)
        v[seg] = _seg_stats(head["V"][seg]["inputs"], d)
        ma[seg] = parse_number(head["K"][seg]["inputs"]["mass_alpha"][1])
        mv[seg] = parse_number(head["K"][seg]["inputs"]["mass_avo"][1])
    return HeadInputs(parse_number(str(tau)) if not isinstance(tau, Fraction) else tau,
                      parse_number(head["q_max"]), k, v, ma, mv)


class _WorstOf:
    """A format stand-in whose error is the largest of several formats' (for segments with blocks)."""

    def __init__(self, fmts):
        self.fmts = fmts

    def l2_error(self, s):
        return max(f.l2_error(s) for f in self.fmts)


def _with_blocks(head, fk, fv, fmts, hi, t: int = None):
    """Blocks override formats on some positions; for the first-order bound a segment's error is
    the worst over its own format and every block format overlapping its positions (the sink holds
    [0, S), the recent window and the rest hold [S, T)) — sound and conservative."""
    for kv, fd in (("K", fk), ("V", fv)):
        blocks = head[kv]["blocks"]
        if not blocks:
            continue
        s_len = head[kv]["sink"]["length"]
        for seg in list(fd):
            over = [fmts[b["format"]] for b in blocks
                    if (b["start"] < s_len if seg == "sink" else b["end"] > s_len)]
            if over:
                fd[seg] = _WorstOf([fd[seg]] + over)
    return fk, fv
