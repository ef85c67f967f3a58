"""Enumerate and decide every obligation of a plan (docs/design.md §5). Nothing the plan *claims*
is trusted: all numbers are recomputed from the plan's inputs and the formats' definitions, through
the one run-time meaning of a rule plan (``hnfverify.core.semantics``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction

from ..bound import UNBOUNDED, amplification, chain_stages, injected, injected_frobenius, plan_bounds
from ..formats import format_table
from ..numbers import fmt_bound, fmt_number, parse_number, round_up, sqrt_up
from ..planview import view
from ..semantics import READER, reachable
from . import PROVED, REFUTED, UNKNOWN
from .smt import composition_query, kl_query, monotonicity_lemma, precision_chain_query, run_queries, suffix_composition_query


@dataclass
class Obligation:
    id: str
    family: str                 # precision-lower-bound | attention-error-budget | composition-law | kl-budget | claims | lemma
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
    max_kl: Fraction | None = None   # `check --max-kl K`: the gate's own KL budget (obligation kl/gate, §5)


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


def _positions_minus_blocks(lo: int, hi: int, blocks) -> list:
    """[lo, hi) without the blocks' positions, as a list of [start, end) ranges."""
    out, cur = [], lo
    for b in sorted(blocks, key=lambda b: b.start):
        if b.end <= cur or b.start >= hi:
            continue
        if b.start > cur:
            out.append((cur, b.start))
        cur = max(cur, b.end)
    if cur < hi:
        out.append((cur, hi))
    return out


def _precision_items(pv):
    """(stream, id suffix, reader segment, chain, stats, kappa, position ranges) for every stored form
    a query can read (docs/design.md §4, §5): reachable states with a non-empty chain, and blocks."""
    for st in pv.streams():
        for state, lo, hi in reachable(st.rule, pv.max_seq_len):
            chain = st.rule.chain(state)
            seg = READER[state]
            rng = _positions_minus_blocks(lo, hi, st.blocks)
            if chain and rng:
                yield st, state.value, seg, chain, st.stats[seg], st.kappa[seg], rng
        for bi, b in enumerate(st.blocks):
            yield st, f"block{bi}", f"block{bi}", (b.fmt,), b.stats, b.kappa, [(b.start, b.end)]


def precision_terms(eps, c, chain, stats, kappa):
    """(stages [(format, stats, error)], rhs, domain problems) of one stored form (docs/design.md §2.2-2.3)."""
    stages = chain_stages(chain, stats)
    rhs = c * kappa * sum((f.u * f.theorem_diameter(s) ** 2 for f, s, _ in stages), Fraction(0))
    domain = [f"{f.name}: amax {fmt_number(s.amax)} > {fmt_number(f.domain_max)}"
              for f, s, _ in stages if not f.representable(s)]
    return stages, rhs, domain


def check_plan(plan: dict, options: CheckOptions = CheckOptions()) -> CheckResult:
    t0 = time.perf_counter()
    pv = view(plan)
    eps, c = pv.eps, pv.c
    obligations: list[Obligation] = []
    smt_jobs = []
    entries = 0

    # ---- (a) Theorem 5.7 and the format domains, once per stored form (all its positions share inputs)
    for st, suffix, seg, chain, stats, kappa, rng in _precision_items(pv):
        stages, rhs, domain = precision_terms(eps, c, chain, stats, kappa)
        last_f, last_s, _ = stages[-1]
        n_pos = sum(e - s for s, e in rng)
        entries += n_pos
        loc = {"layer": st.layer, "kv_head": st.head, "kv": st.kv, "segment": suffix,
               "positions": [[s, e] for s, e in rng]}
        ob = Obligation(f"precision/L{st.layer}/H{st.head}/{st.kv}/{suffix}", "precision-lower-bound", loc)
        ob.witness = {"eps": fmt_number(eps), "c": fmt_number(c), "kappa_hi": fmt_number(kappa), "reader": seg,
                      "stages": [{"format": f.name, "u": fmt_number(f.u), "D_hi": fmt_number(f.theorem_diameter(s)),
                                  "amax_hi": fmt_number(s.amax), "error": fmt_number(e)} for f, s, e in stages],
                      "rhs": fmt_number(rhs), "format": last_f.name, "u": fmt_number(last_f.u),
                      "D_hi": fmt_number(last_f.theorem_diameter(last_s)),
                      "domain": "; ".join(domain) if domain else "ok"}
        if domain or eps < rhs:
            ob.verdict = REFUTED
            ob.witness["first_violation_position"] = rng[0][0]
            ob.witness["violations"] = n_pos
            ob.witness["cheapest_admissible"] = _cheapest_admissible(eps, c, stages, kappa, seg, plan)
        else:
            ob.verdict = PROVED
            if st.kv == "K" and options.smt:
                ob.smt = precision_chain_query(eps, c, kappa, [(f.u, f.theorem_diameter(s)) for f, s, _ in stages],
                                               ob.id, options.timeout_ms)
                smt_jobs.append(ob)
        obligations.append(ob)
    t1 = time.perf_counter()

    # ---- (b) the attention-output bound per (layer, head), (c) the composition law, (d) the claims
    pb = plan_bounds(pv)
    if pv.eps_source == "user":           # a user's eps is the attention budget, whatever the mode label
        for h in pv.heads():
            key = (h.layer, h.head)
            ob = Obligation(f"attention/L{h.layer}/H{h.head}", "attention-error-budget",
                            {"layer": h.layer, "kv_head": h.head})
            ob.witness = {"eps": fmt_number(eps), "error_bound": fmt_bound(pb.head_errors[key]),
                          "dK": {s: fmt_bound(x) for s, x in pb.dk[key].items()},
                          "dV": {s: fmt_bound(x) for s, x in pb.dv[key].items()}}
            ob.verdict = PROVED if pb.head_errors[key] <= eps else REFUTED
            obligations.append(ob)
    lips = [la.lipschitz for la in pv.layers]
    mlps = [la.mlp_lipschitz for la in pv.layers]
    inj = injected(pb.layer_bounds, mlps)
    suffix = pv.composition.form == "suffix"
    if pv.eps_target is not None and suffix:
        comp = pv.composition
        eps_f = injected_frobenius(pb.layer_bounds, pv.max_seq_len)
        ss = UNBOUNDED if UNBOUNDED in eps_f else sum((e * e for e in eps_f), Fraction(0))
        ob = Obligation("composition", "composition-law", {"layers": len(pv.layers)})
        ob.witness = {"form": "suffix", "eps_target": fmt_number(pv.eps_target), "end_to_end_bound": fmt_bound(pb.end_to_end),
                      "layer_bounds": [fmt_bound(b) for b in pb.layer_bounds],
                      "injected": [fmt_bound(e) for e in eps_f], "suffix": [fmt_number(la.suffix) for la in pv.layers],
                      "remainder": fmt_number(comp.remainder), "radius": fmt_number(comp.radius),
                      "sum_sq": fmt_bound(ss)}
        ob.verdict = PROVED if pb.end_to_end <= pv.eps_target else REFUTED
        if ob.verdict == PROVED and options.smt:
            ob.smt = suffix_composition_query(eps_f, [la.suffix for la in pv.layers], comp.remainder / 2, ss,
                                              comp.radius, pv.eps_target, options.timeout_ms)
            smt_jobs.append(ob)
        obligations.append(ob)
    if pv.eps_target is not None and not suffix:
        sqrt_t = sqrt_up(Fraction(pv.max_seq_len))
        ob = Obligation("composition", "composition-law", {"layers": len(pv.layers)})
        ob.witness = {"form": "product", "eps_target": fmt_number(pv.eps_target),
                      "end_to_end_bound": fmt_bound(pb.end_to_end), "sqrt_T": fmt_number(sqrt_t), "layer_bounds": [fmt_bound(b) for b in pb.layer_bounds],
                      "lipschitz": [fmt_number(x) for x in lips], "mlp_lipschitz": [fmt_number(x) for x in mlps],
                      "injected": [fmt_bound(x) for x in inj],
                      "amplification": [fmt_bound(x) for x in amplification(lips)]}
        ob.verdict = PROVED if pb.end_to_end <= pv.eps_target else REFUTED
        if ob.verdict == PROVED and options.smt:
            ob.smt = composition_query(inj, lips, sqrt_t, pv.eps_target, options.timeout_ms)
            smt_jobs.append(ob)
        obligations.append(ob)
    for oid, budget in (("kl", pv.max_kl), ("kl/gate", options.max_kl)):
        if budget is None:
            continue
        ob = Obligation(oid, "kl-budget", {} if oid == "kl" else {"source": "check --max-kl"})
        gain = pv.composition.logit_gain
        ob.witness = {"max_kl": fmt_number(budget), "kl_bound": fmt_bound(pb.kl), "logit_bound": fmt_bound(pb.logit),
                      "end_to_end_bound": fmt_bound(pb.end_to_end),
                      "logit_gain": None if gain is None else fmt_number(gain), "form": pv.composition.form}
        ob.verdict = PROVED if pb.kl <= budget else REFUTED
        if ob.verdict == PROVED and options.smt:
            ob.smt = kl_query(pb.end_to_end, gain, budget, options.timeout_ms)
            smt_jobs.append(ob)
        obligations.append(ob)
    obligations.append(_claims(plan, pv, pb))
    if options.smt:
        lemma = Obligation("lemma/monotonicity", "lemma", {})
        lemma.smt = monotonicity_lemma(options.timeout_ms)
        lemma.verdict = PROVED
        smt_jobs.insert(0, lemma)
        obligations.insert(0, lemma)
        if options.smt_per_position:
            smt_jobs += _per_position_jobs(obligations, options)

    # ---- the solver must agree with every exact PROVED decision; anything else fails closed
    t2 = time.perf_counter()
    answers = run_queries([o.smt for o in smt_jobs], options.solver, options.timeout_ms, options.wall_timeout_s)
    for ob, ans in zip(smt_jobs, answers):
        if ans["result"] == "unsat":
            continue
        ob.verdict = UNKNOWN
        if ans["result"] == "sat":
            ob.reason = f"{options.solver} found the negation satisfiable, disagreeing with the exact decision"
        else:
            ob.reason = f"{options.solver}: {ans.get('reason') or 'unknown'}"
    t3 = time.perf_counter()
    n_exact = sum(o.family == "precision-lower-bound" for o in obligations)
    timings = {"expand_s": 0.0, "filter_s": t1 - t0, "bounds_s": t2 - t1, "smt_s": t3 - t2}
    return CheckResult(obligations, entries, n_exact, timings, pb.end_to_end, pb.layer_bounds)


def _claims(plan: dict, pv, pb) -> Obligation:
    """The plan's claimed bounds must be upper bounds of the recomputed ones (null: above 1e300)."""
    claims = plan["claims"]
    att = [max(pb.head_errors[(la.index, h.head)] for h in la.heads) for la in pv.layers]
    bad = []

    def cmp(path, claimed, exact):
        if claimed is not None and parse_number(claimed) < exact:
            bad.append(f"{path} = {claimed} < " + ("more than 1E+300" if fmt_bound(exact) is None
                                                  else fmt_number(round_up(exact, 20))))

    for i, b in enumerate(pb.layer_bounds):
        cmp(f"$.claims.layer_bounds[{i}]", claims["layer_bounds"][i], b)
    for i, a in enumerate(att):
        cmp(f"$.claims.attention_error_max[{i}]", claims["attention_error_max"][i], a)
    cmp("$.claims.end_to_end_bound", claims["end_to_end_bound"], pb.end_to_end)
    cmp("$.claims.logit_bound", claims["logit_bound"], pb.logit)
    cmp("$.claims.kl_bound", claims["kl_bound"], pb.kl)
    ob = Obligation("claims", "claims", {})
    ob.witness = {"layer_bounds": [fmt_bound(b) for b in pb.layer_bounds],
                  "attention_error_max": [fmt_bound(a) for a in att],
                  "end_to_end_bound": fmt_bound(pb.end_to_end), "logit_bound": fmt_bound(pb.logit),
                  "kl_bound": fmt_bound(pb.kl), "understated": bad}
    ob.verdict = REFUTED if bad else PROVED
    return ob


def _per_position_jobs(obligations, options) -> list:
    jobs = []
    for ob in list(obligations):
        if ob.family != "precision-lower-bound" or ob.verdict != PROVED or ob.location["kv"] != "K":
            continue
        w = ob.witness
        stages = [(parse_number(x["u"]), parse_number(x["D_hi"])) for x in w["stages"]]
        for s, e in ob.location["positions"]:
            for pos in range(s, e):
                o = Obligation(f"{ob.id}/t{pos}", "precision-lower-bound-position",
                               dict(ob.location, positions=[[pos, pos + 1]]))
                o.verdict = PROVED
                o.smt = precision_chain_query(parse_number(w["eps"]), parse_number(w["c"]),
                                              parse_number(w["kappa_hi"]), stages, o.id, options.timeout_ms)
                jobs.append(o)
                obligations.append(o)
    return jobs


def _cheapest_admissible(eps, c, stages, kappa, seg, plan):
    """The cheapest format that could replace the last stage of a refuted stored form."""
    prior = stages[:-1]
    last_stats = stages[-1][1]
    d = plan["shape"]["head_dim"]
    before = sum((f.u * f.theorem_diameter(s) ** 2 for f, s, _ in prior), Fraction(0))
    table = format_table(d, plan["analysis"]["channel_group"])
    ok = [f for f in table.values()
          if f.representable(last_stats) and (f.granularity != "channel" or seg == "rest")
          and eps >= c * kappa * (before + f.u * f.theorem_diameter(last_stats) ** 2)]
    if not ok:
        return None
    return min(ok, key=lambda f: (f.bits_per_element, f.name)).name
