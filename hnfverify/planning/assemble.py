"""The plan's last steps: Theorem 5.7 for every stored form (``raise_to_theorem``), the claims, and the
JSON document (``assemble``, docs/design.md §3)."""

from __future__ import annotations

from fractions import Fraction

from ..core.numbers import dec_down, dec_up, fmt_number, parse_number, show_bound
from ..core.plan import SCHEMA_VERSION
from ..core.semantics import READER, SEGMENTS, State, StreamRule, reachable
from ..core.verify.obligations import precision_terms
from ..errors import PlanInfeasible
from .request import ASSIGNED, BUDGET_SPLIT, EPS_SPLIT
from .search import average_bits, norm_overhead
from .units import theorem_term, total_bits


def claim_up(x: Fraction) -> str | None:
    """A bound for the plan's claims, rounded up to 6 digits; None (JSON null) above 1e300, beyond the
    range of plan numbers — such a bound is vacuous anyway (INT2 keys make exp(tau q dK) huge)."""
    return None if x > 10 ** 300 else dec_up(float(x), 6)


def stored_form_terms(units, state, c) -> list:
    """[(units whose formats the form passed through, rhs c kappa sum u D^2, domain problems)] for every
    stored form a query can read (docs/design.md §4), by the checker's own definition
    (``semantics.reachable``, ``verify.obligations.precision_terms``): what the plan must satisfy."""
    streams: dict = {}
    for u in units:
        streams.setdefault((u.layer, u.head, u.kv), {})[u.seg] = u
    out = []
    for segs in streams.values():
        one = next(iter(segs.values()))
        fmts = {seg: u.chain[state[u.idx]] for seg, u in segs.items()}
        fill = fmts.get("rest") or next(iter(fmts.values()))
        rule = StreamRule(one.sink, one.recent, {seg: fmts.get(seg, fill) for seg in SEGMENTS})
        for stored_state, _, _ in reachable(rule, one.max_seq_len):
            chain = rule.chain(stored_state)
            if not chain:
                continue
            reader = segs[READER[stored_state]]
            if stored_state is State.REST:
                passed = (["recent"] if one.recent > 0 else []) + ["rest"]
            else:
                passed = ["recent"] if stored_state is State.RECENT_FAR else [READER[stored_state]]
            through = [segs[s] for s in passed]
            _, rhs, domain = precision_terms(Fraction(0), c, chain, reader.stats, reader.kappa[1])
            out.append((through, rhs, domain))
    return out


def implied_eps(units, state, c) -> Fraction:
    """The smallest eps for which Theorem 5.7 holds for every stored key form of the plan."""
    return max((rhs for us, rhs, _ in stored_form_terms(units, state, c) if us[0].kv == "K"), default=Fraction(0))


def raise_to_theorem(units, state, req) -> list:
    """Raise formats along their chains until every stored form is in its formats' domains and, with a
    user eps, satisfies Theorem 5.7 in its chain form. Moving up a chain never raises any bound."""
    state = list(state)
    while True:
        bad = [(us, rhs, dom) for us, rhs, dom in stored_form_terms(units, state, req.c)
               if dom or (req.eps is not None and us[0].kv == "K" and rhs > req.eps)]
        if not bad:
            return state
        for us, rhs, dom in bad:
            up = [u for u in us if state[u.idx] + 1 < len(u.chain)]
            if not up:
                u = us[-1]
                raise PlanInfeasible(f"layer {u.layer} head {u.head} {u.kv} {u.seg}: "
                                     + (f"values outside every format's domain ({dom[0]})" if dom else
                                        f"Theorem 5.7 needs eps >= {show_bound(rhs)} even with the finest "
                                        "formats of the chain"))
            u = up[-1] if dom else max(up, key=lambda u: theorem_term(u.chain[state[u.idx]], u, req.c))
            state[u.idx] += 1


def composition_entry(comp: dict) -> dict:
    """$.composition (docs/design.md §2.5)."""
    if comp["form"] != "suffix":
        return {"form": "product", "remainder": None, "logit_gain": None}
    m = fmt_number(comp["margin"])
    return {"form": "suffix",
            "remainder": {"measured": fmt_number(comp["remainder_meas"]), "margin": m,
                          "value": fmt_number(comp["remainder"]), "radius": fmt_number(comp["radius"])},
            "logit_gain": {"measured": fmt_number(comp["logit_gain_meas"]), "margin": "1",
                           "value": fmt_number(comp["logit_gain"])}}


def composition_assumptions(comp: dict, calib: dict, summary: dict) -> list:
    """The measured quantities the suffix form rests on (docs/design.md §2.5, §2.6), with provenance."""
    if comp["form"] != "suffix":
        return []
    prov = {"calibration_sha256": calib["token_ids_sha256"], **(summary["analysis"].get("suffix") or {})}
    m = fmt_number(comp["margin"])
    return [
        {"name": "suffix sensitivity", "statement": "for every layer l, the Jacobian from layer l's attention output "
         "(all positions) to the lm_head input (all positions) has spectral norm <= S_l = measured x margin at "
         "deployment inputs (the measurement is a power-iteration lower estimate at one calibration window)",
         "margin": m, "value": max((fmt_number(s) for s in comp["suffix"]), key=parse_number), "provenance": prov},
        {"name": "remainder", "statement": "for every error e with ||e|| <= radius, ||F(e) - F(0) - J e|| <= (K/2) "
         "||e||^2 with K = measured x margin (probed along random and top singular directions)", "margin": m,
         "value": fmt_number(comp["remainder"]), "provenance": {**prov, "radius": fmt_number(comp["radius"])}},
        {"name": "logit gain", "statement": "logits are lm_head(H) (+ bias), so osc(dz_t) <= Gamma ||dH_t|| with "
         "Gamma = 2 max_i ||w_i|| computed from the weights", "margin": "1", "value": fmt_number(comp["logit_gain"]),
         "provenance": {"lm_head": "float64 row norms of the float32 weights, times 1 + 2^-40"}},
    ]


def assemble(summary, req, units, state, meta, table, tau, lips, lips_meas, mlps, mlp_meas, onorm, qmax, layer_b,
              e_l, mode, report_name, comp) -> dict:
    from .. import __version__

    shape = summary["shape"]
    n_l, n_h = shape["layers"], shape["kv_heads"]
    used = sorted({u.chain[s].name for u, s in zip(units, state)})
    if req.eps is not None:
        eps, eps_source = req.eps, "user"
    else:
        eps, eps_source = parse_number(dec_up(float(implied_eps(units, state, req.c)) * (1 + 1e-12) + 1e-300, 6)), \
            "implied"
        while eps < implied_eps(units, state, req.c):
            eps *= 2
    layers = []
    by_lh: dict = {}
    for u, s in zip(units, state):
        by_lh.setdefault((u.layer, u.head), {}).setdefault(u.kv, {})[u.seg] = (u, s)
    for li in range(n_l):
        heads = []
        for h in range(n_h):
            entry = {"kv_head": h, "o_proj_norm": fmt_number(onorm[li][h]), "q_max": fmt_number(qmax[li][h])}
            for kv in ("K", "V"):
                segs = by_lh[(li, h)][kv]
                rule = {"blocks": []}
                for seg in SEGMENTS:
                    if seg in segs:
                        u, si = segs[seg]
                        item = {"format": u.chain[si].name, "inputs": u.inputs}
                    else:
                        rest_u, rest_s = segs.get("rest") or next(iter(segs.values()))
                        item = {"format": rest_u.chain[rest_s].name, "inputs": None}
                    if seg != "rest":
                        item["length"] = meta["lengths"][seg]
                    rule[seg] = item
                entry[kv] = rule
            heads.append(entry)
        layers.append({
            "layer": li, "tau": fmt_number(tau[li]),
            "lipschitz": {"measured": dec_up(float(lips_meas[li])), "margin": fmt_number(req.lipschitz_margin),
                          "value": fmt_number(lips[li])},
            "mlp_lipschitz": {"measured": dec_up(float(mlp_meas[li])), "margin": fmt_number(req.lipschitz_margin),
                              "value": fmt_number(mlps[li])},
            "suffix": None if comp["form"] != "suffix" else
            {"measured": fmt_number(comp["suffix_meas"][li]), "margin": fmt_number(comp["margin"]),
             "value": fmt_number(comp["suffix"][li])},
            "heads": heads,
        })
    calib = summary["calibration"]
    ov = norm_overhead(req, meta["head_dim"])
    avg = average_bits(units, state, ov)
    n_streams = 2 * shape["layers"] * shape["kv_heads"]
    cache_bits = total_bits(units, state, meta["head_dim"]) + ov * meta["head_dim"] * meta["max_seq_len"] * n_streams
    assumptions = [
        {"name": "curvature", "statement": "for every deployment query, kappa_t <= the plan's kappa upper end "
         "(the sup over calibration queries, split by query distance for recent/rest)",
         "value": max((u.inputs["kappa"][1] for u in units), key=parse_number), "margin": "1",
         "provenance": {"calibration_sha256": calib["token_ids_sha256"], "windows": calib["n_windows"],
                        "tokens": calib["n_tokens"], "curvature": meta["curvature"],
                        "queries": int(calib["n_tokens"]) * int(summary["shape"]["query_heads"])}},
        {"name": "ranges", "statement": "every cached key/value lies within the plan's amax, d_token and d_channel "
         "upper ends (and its Hadamard rotation within d_token_h and amax_h, where given)", "margin": "1", "value": max((u.inputs["amax"][1] for u in units), key=parse_number),
         "provenance": {"calibration_sha256": calib["token_ids_sha256"], "windows": calib["n_windows"]}},
        {"name": "attention mass", "statement": "every deployment query puts at most mass_alpha (and mass_avo) on "
         "each segment, and ||q|| <= q_max", "margin": "1",
         "value": max((u.inputs["mass_alpha"][1] for u in units), key=parse_number),
         "provenance": {"calibration_sha256": calib["token_ids_sha256"], "windows": calib["n_windows"]}},
        {"name": "lipschitz", "statement": "each decoder block is L-Lipschitz on deployment hidden states with L = "
         "measured x margin (the measurement is a power-iteration lower bound of the local Jacobian norm)",
         "margin": fmt_number(req.lipschitz_margin), "value": max((x["lipschitz"]["value"] for x in layers),
                                                                   key=parse_number),
         "provenance": {"calibration_sha256": calib["token_ids_sha256"],
                        "tokens": summary["analysis"]["lipschitz_tokens"],
                        "iterations": summary["analysis"]["lipschitz_iters"]}},
        *composition_assumptions(comp, calib, summary),
        {"name": "sequence length", "statement": f"sequences are at most max_seq_len = {meta['max_seq_len']} "
         "tokens (the analyzed window)", "margin": "1", "value": str(meta["max_seq_len"]),
         "provenance": {"window": summary["shape"]["positions"]}},
    ]
    plan = {
        "schema_version": SCHEMA_VERSION,
        "kind": "hnfverify-plan",
        "tool": {"name": "hnfverify", "version": __version__},
        "model": {k: str(v) for k, v in summary["model"].items()},
        "calibration": {k: str(v) for k, v in calib.items()},
        "analysis": {"report": report_name, "arrays_sha256": summary["arrays"]["sha256"],
                     "curvature": meta["curvature"], "channel_group": meta["channel_group"]},
        "shape": {k: shape[k] for k in ("layers", "kv_heads", "query_heads", "head_dim")},
        "max_seq_len": meta["max_seq_len"],
        "eps": fmt_number(eps), "eps_source": eps_source,
        "eps_target": fmt_number(req.eps_target) if req.eps_target is not None else None,
        "max_kl": fmt_number(req.max_kl) if req.max_kl is not None else None,
        "composition": composition_entry(comp),
        "c": fmt_number(req.c),
        "mode": {**mode, "budget_split": ASSIGNED if mode["kind"] in ("uniform", "assigned")
                 else BUDGET_SPLIT[req.objective] if mode["kind"] == "avg_bits" else EPS_SPLIT
                 + (" " + BUDGET_SPLIT["end_to_end"] if req.eps_target is not None else "")},
        "rule": {"sink": meta["lengths"]["sink"], "recent": meta["lengths"]["recent"],
                 **({"error_norms": "u8log"} if req.error_norms else {})},
        "formats": {n: table[n].to_json() for n in used},
        "layers": layers,
        "assumptions": assumptions,
        "claims": {
            "avg_bits": fmt_number(avg),
            "compression_vs_fp16": dec_down(float(Fraction(16) / avg), 6),
            "cache_bits_at_max_seq_len": fmt_number(cache_bits),
            "layer_bounds": [claim_up(b) for b in layer_b],
            "end_to_end_bound": claim_up(e_l),
            "theorem_5_7_violations": sum(1 for us, rhs, dom in stored_form_terms(units, state, req.c)
                                          if dom or (us[0].kv == "K" and eps < rhs)),
        },
    }
    return plan
