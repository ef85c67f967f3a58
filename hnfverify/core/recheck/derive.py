"""Every obligation a plan implies, re-derived (docs/design.md §5)."""

import math
from fractions import Fraction as F

from .base import expect
from .numbers import bound, exp_up, fmt, num, round_up, show, sqrt_up
from .formats import chain_stages, diam, domain_ok
from .semantics import (READER, chain, minus_blocks, reachable, seg_errors, smt_composition, smt_kl, smt_monotonicity, smt_precision, smt_suffix,
                        stream)


INF = math.inf          # a branch not evaluated (an exponent above 128, §2.4), or e_L of such: +infinity


def up(x):
    return x if x == INF else round_up(x)


# ---------------------------------------------------------------- obligations (§5)
def ob(oid, family, location, witness, smt=None):
    o = {"id": oid, "family": family, "location": location, "verdict": "PROVED", "witness": witness}
    if smt is not None:
        o["smt2"] = smt
    return o


def precision(eps, c, t, layer, head, st):
    """The precision-lower-bound obligations of one stream (§5.2) and their number of positions."""
    items = []
    for state, lo, hi in reachable(st, t):
        rng, ch = minus_blocks(lo, hi, st["blocks"]), chain(st, state)
        if ch and rng:
            seg = READER[state]
            items.append((state, seg, ch, st["stats"][seg], st["kappa"][seg], rng))
    items += [(f"block{i}", f"block{i}", (b["f"],), b["stats"], b["kappa"], [[b["start"], b["end"]]])
              for i, b in enumerate(st["blocks"])]
    out, positions = [], 0
    for suffix, reader, ch, ranges, kap, rng in items:
        oid = f"precision/L{layer}/H{head}/{st['kv']}/{suffix}"
        stages = chain_stages(ch, ranges)
        rhs = c * kap * sum((f["u"] * diam(f, s) ** 2 for f, s, _ in stages), F(0))
        for f, s, _ in stages:
            expect(domain_ok(f, s), f"{oid}: does not hold: {f['name']} out of its domain (amax "
                                             f"{fmt(s['amax'])} > {fmt(f['domain'])}), the plan violates it")
        expect(rhs <= eps, f"{oid}: does not hold: c kappa sum u D^2 = {show(rhs)} exceeds eps = {fmt(eps)}, "
                           "the plan violates it")
        positions += sum(e - s for s, e in rng)
        last_f, last_s, _ = stages[-1]
        w = {"eps": fmt(eps), "c": fmt(c), "kappa_hi": fmt(kap), "reader": reader,
             "stages": [{"format": f["name"], "u": fmt(f["u"]), "D_hi": fmt(diam(f, s)), "amax_hi": fmt(s["amax"]),
                         "error": fmt(e)} for f, s, e in stages],
             "rhs": fmt(rhs), "format": last_f["name"], "u": fmt(last_f["u"]), "D_hi": fmt(diam(last_f, last_s)),
             "domain": "ok"}
        loc = {"layer": layer, "kv_head": head, "kv": st["kv"], "segment": suffix, "positions": rng}
        smt = smt_precision(eps, c, kap, [(f["u"], diam(f, s)) for f, s, _ in stages], oid) if st["kv"] == "K" else None
        out.append(ob(oid, "precision-lower-bound", loc, w, smt))
    return out, positions


def head_error(tau, q, k, v):
    """E_h of §2.4 with the per-segment dK, dV; masses and spreads: the larger of the K and the V rule's."""
    dk, dv = seg_errors(k), seg_errors(v)
    if not dk:
        return F(0), dk, dv
    m = {s: round_up(tau * q * dk[s]) for s in dk}
    big = max(m.values())

    def inp(s, key):
        return max(num(x[s][key][1]) for x in (k["inputs"], v["inputs"]) if s in x)

    def e(s):                      # e^(m_s + M), None above 128 (not evaluated, §2.4)
        return None if m[s] + big > 128 else exp_up(m[s] + big)

    first = sum((round_up((F(1) if e(s) is None else min(F(1), round_up(e(s) * inp(s, "mass_alpha"))))
                          * dv.get(s, F(0))) for s in dk), F(0))
    first = min(first, max(dv.get(s, F(0)) for s in dk))
    if any(e(s) is None for s in dk):
        order1 = INF
    else:
        order1 = round_up(sum((round_up((e(s) - 1) * inp(s, "mass_avo")) for s in dk), F(0)))
    th = F(1) if big > 128 else min(round_up(big / 2), round_up(1 - 2 / (exp_up(big) + 1)))
    tv = round_up(2 * th * max(inp(s, "vo") for s in dk))
    return round_up(first + min(order1, tv)), dk, dv


def derive(plan, gate_max_kl=None):
    """(obligations exactly as a PROVED certificate holds them, positions, e_L, layer bounds); Reject on
    the first obligation that does not hold."""
    eps, c, t, d = num(plan["eps"]), num(plan["c"]), plan["max_seq_len"], plan["shape"]["head_dim"]
    sg = sqrt_up(F(plan["shape"]["query_heads"] // plan["shape"]["kv_heads"]))
    out, positions, bl, att = [ob("lemma/monotonicity", "lemma", {}, {}, smt_monotonicity())], 0, [], []
    for layer in plan["layers"]:
        li, tau, b_l, worst = layer["layer"], num(layer["tau"]), F(0), F(0)
        for head in layer["heads"]:
            hi, sts = head["kv_head"], {kv: stream(head[kv], kv, t, d) for kv in "KV"}
            for kv in "KV":
                obs, n = precision(eps, c, t, li, hi, sts[kv])
                out, positions = out + obs, positions + n
            e_h, dk, dv = head_error(tau, num(head["q_max"]), sts["K"], sts["V"])
            b_l, worst = b_l + up(num(head["o_proj_norm"]) * sg * e_h), max(worst, e_h)
            if plan["eps_source"] == "user":                        # §5.3
                expect(e_h <= eps, f"attention/L{li}/H{hi}: does not hold: E_h = {show(e_h)} exceeds eps = "
                                   f"{fmt(eps)}, the plan violates it")
                out.append(ob(f"attention/L{li}/H{hi}", "attention-error-budget", {"layer": li, "kv_head": hi},
                              {"eps": fmt(eps), "error_bound": bound(e_h), "dK": {s: bound(x) for s, x in dk.items()},
                               "dV": {s: bound(x) for s, x in dv.items()}}))
        bl.append(up(b_l))
        att.append(worst)
    lips = [num(la["lipschitz"]["value"]) for la in plan["layers"]]     # §2.5, §5.4
    mlps = [num(la["mlp_lipschitz"]["value"]) for la in plan["layers"]]
    inj = [INF if b == INF else round_up(a * b) for a, b in zip(mlps, bl)]
    amp, acc = [F(1)] * len(lips), F(1)
    for i in range(len(lips) - 1, -1, -1):
        amp[i], acc = acc, round_up(acc * lips[i])
    sq = sqrt_up(F(t))
    comp = plan["composition"]
    if comp["form"] == "suffix":                                        # §2.5 suffix form, §2.6
        sfx = [num(la["suffix"]["value"]) for la in plan["layers"]]
        k, rho, gain = num(comp["remainder"]["value"]), num(comp["remainder"]["radius"]), num(comp["logit_gain"]["value"])
        eps_f = [up(sq * b) for b in bl]
        ss = INF if INF in eps_f else sum((x * x for x in eps_f), F(0))
        e_l = INF if ss > rho * rho else round_up(sum((round_up(s * x) for s, x in zip(sfx, eps_f)), F(0))
                                                    + round_up(k * ss / 2))
        z_up = up(gain * e_l)
        kl = up(z_up * z_up / 8)
    else:
        e_l = INF if INF in inj else round_up(sq * sum((round_up(a * b) for a, b in zip(amp, inj)), F(0)))
        z_up = kl = INF
    if plan["eps_target"] is not None and comp["form"] == "suffix":
        tgt = num(plan["eps_target"])
        expect(e_l <= tgt, f"composition: does not hold: Phi = {show(e_l)} exceeds eps_target = {fmt(tgt)}, "
                           "the plan violates it")
        w = {"form": "suffix", "eps_target": fmt(tgt), "end_to_end_bound": bound(e_l),
             "layer_bounds": [bound(b) for b in bl], "injected": [bound(x) for x in eps_f],
             "suffix": [fmt(x) for x in sfx], "remainder": fmt(k), "radius": fmt(rho), "sum_sq": bound(ss)}
        out.append(ob("composition", "composition-law", {"layers": len(bl)}, w,
                      smt_suffix(eps_f, sfx, k / 2, ss, rho, tgt)))
    elif plan["eps_target"] is not None:
        tgt = num(plan["eps_target"])
        expect(e_l <= tgt, f"composition: does not hold: e_L = {show(e_l)} exceeds eps_target = {fmt(tgt)}, "
                           "the plan violates it")
        w = {"form": "product", "eps_target": fmt(tgt), "end_to_end_bound": bound(e_l), "sqrt_T": fmt(sq),
             "layer_bounds": [bound(b) for b in bl], "lipschitz": [fmt(x) for x in lips],
             "mlp_lipschitz": [fmt(x) for x in mlps], "injected": [bound(x) for x in inj],
             "amplification": [bound(x) for x in amp]}
        out.append(ob("composition", "composition-law", {"layers": len(bl)}, w, smt_composition(inj, lips, sq, tgt)))
    for oid, mk in (("kl", num(plan["max_kl"]) if plan["max_kl"] is not None else None), ("kl/gate", gate_max_kl)):
        if mk is None:                                                  # §5.5
            continue
        expect(kl <= mk, f"{oid}: does not hold: the KL bound {show(kl)} exceeds max_kl = {fmt(mk)}")
        out.append(ob(oid, "kl-budget", {} if oid == "kl" else {"source": "check --max-kl"},
                      {"max_kl": fmt(mk), "kl_bound": bound(kl), "logit_bound": bound(z_up),
                       "end_to_end_bound": bound(e_l), "logit_gain": fmt(gain), "form": "suffix"},
                      smt_kl(e_l, gain, mk)))
    cl = plan["claims"]                                                 # §5.5
    claimed = [(f"layer_bounds[{i}]", cl["layer_bounds"][i], b) for i, b in enumerate(bl)]
    claimed += [(f"attention_error_max[{i}]", cl["attention_error_max"][i], a) for i, a in enumerate(att)]
    claimed += [("end_to_end_bound", cl["end_to_end_bound"], e_l), ("logit_bound", cl["logit_bound"], z_up),
                ("kl_bound", cl["kl_bound"], kl)]
    for path, x, exact in claimed:
        expect(x is None or num(x) >= exact, f"claims: does not hold: $.claims.{path} = {x} is below the "
                                             f"recomputed {show(exact)}, the plan understates it")
    out.append(ob("claims", "claims", {}, {"layer_bounds": [bound(b) for b in bl],
                                          "attention_error_max": [bound(a) for a in att],
                                          "end_to_end_bound": bound(e_l), "logit_bound": bound(z_up),
                                          "kl_bound": bound(kl), "understated": []}))
    return out, positions, e_l, bl


def audit(obligations):
    """The optional per-position audit (`check --smt-per-position`): one query per key position."""
    out = []
    for o in obligations:
        if o["family"] == "precision-lower-bound" and o["location"]["kv"] == "K":
            w = o["witness"]
            stages = [(F(x["u"]), F(x["D_hi"])) for x in w["stages"]]
            for s, e in o["location"]["positions"]:
                for pos in range(s, e):
                    oid = f"{o['id']}/t{pos}"
                    loc = dict(o["location"], positions=[[pos, pos + 1]])
                    out.append(ob(oid, "precision-lower-bound-position", loc, {},
                                  smt_precision(F(w["eps"]), F(w["c"]), F(w["kappa_hi"]), stages, oid)))
    return out
