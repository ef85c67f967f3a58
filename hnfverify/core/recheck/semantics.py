"""The run-time semantics of a rule plan (§4) and the SMT-LIB2 text, byte for byte."""

from fractions import Fraction as F

from .base import SEGS
from .numbers import num
from .formats import chain_stages, fmt_def, l2_error


# ---------------------------------------------------------------- run-time semantics (§4)
READER = {"sink": "sink", "recent": "recent", "recent-far": "rest", "rest": "rest"}


def chain(st, state):
    """The formats a value in this state passed through, in order (empty: kept exactly)."""
    f, recent = st["fmts"], st["R"] > 0
    return {"sink": (f["sink"],), "recent": (f["recent"],), "recent-far": (f["recent"],) if recent else (),
            "rest": (f["recent"], f["rest"]) if recent else (f["rest"],)}[state]


def reachable(st, t):
    """[(state, lo, hi)]: the states some query < t reads, with their positions (§4)."""
    s, r, out = min(st["S"], t), st["R"], []
    if s > 0:
        out.append(("sink", 0, s))
    if r >= 2 and t - 1 > s:
        out.append(("recent", s, t - 1))
    if r >= 1 and t - r > s:
        out.append(("recent-far", s, t - r))
    a = t - 1                                   # the layout of the last query
    sink_end = min(st["S"], a)
    start = max(sink_end, a - r + 1) if r else a
    g = st["fmts"]["rest"]
    rest_end = max(sink_end, g["group"] * (start // g["group"])) if g["gran"] == "channel" else start
    if rest_end > s:
        out.append(("rest", s, rest_end))
    return out


def minus_blocks(lo, hi, blocks):
    out, cur = [], lo
    for b in blocks:
        if b["end"] <= cur or b["start"] >= hi:
            continue
        if b["start"] > cur:
            out.append([cur, b["start"]])
        cur = max(cur, b["end"])
    if cur < hi:
        out.append([cur, hi])
    return out


def stream(rule, kv, t, d):
    """One (layer, KV head, K|V): lengths, formats, the non-empty segments' ranges and kappa, blocks."""
    s_len, r_len = rule["sink"]["length"], rule["recent"]["length"]
    lens = {"sink": s_len, "recent": r_len, "rest": t - s_len - r_len}

    def ranges(inp):
        return {"d": d, "dt": num(inp["d_token"][1]), "dc": num(inp["d_channel"][1]), "amax": num(inp["amax"][1]),
                "dth": num(inp["d_token_h"][1]) if "d_token_h" in inp else None,
                "amh": num(inp["amax_h"][1]) if "amax_h" in inp else None}

    def kap(inp):
        return num(inp["kappa"][1]) if kv == "K" else F(0)

    segs = [s for s in SEGS if lens[s] > 0]
    return {"kv": kv, "S": s_len, "R": r_len, "fmts": {s: fmt_def(rule[s]["format"]) for s in SEGS},
            "segs": segs, "stats": {s: ranges(rule[s]["inputs"]) for s in segs},
            "kappa": {s: kap(rule[s]["inputs"]) for s in segs}, "inputs": {s: rule[s]["inputs"] for s in segs},
            "blocks": [dict(b, f=fmt_def(b["format"]), stats=ranges(b["inputs"]), kappa=kap(b["inputs"]))
                       for b in rule["blocks"]]}


def seg_errors(st):
    """Per segment, the largest error of any stored form read as it (§2.4): the chains of the states
    whose reader it is, and the blocks overlapping it."""
    out = {}
    for seg in st["segs"]:
        errs = [chain_stages(chain(st, x), st["stats"][seg]) for x in READER if READER[x] == seg]
        errs = [c[-1][2] if c else F(0) for c in errs]
        errs += [l2_error(b["f"], b["stats"]) for b in st["blocks"]
                 if (b["start"] < st["S"] if seg == "sink" else b["end"] > st["S"])]
        out[seg] = max(errs)
    return out


# ---------------------------------------------------------------- SMT-LIB2 text (byte for byte)
def lit(x):
    x = F(x)
    if x < 0:
        return f"(- {lit(-x)})"
    return f"{x.numerator}.0" if x.denominator == 1 else f"(/ {x.numerator}.0 {x.denominator}.0)"


def header(logic, comment):
    return (f"(set-info :status unsat)\n(set-info :source |hnfverify: {comment}|)\n(set-option :random-seed 0)\n"
            f"(set-logic {logic})\n")


def smt_precision(eps, c, k, stages, comment):
    """UNSAT iff c kappa sum_k u_k D_k^2 <= eps on the box (one stage: c kappa D D u > eps)."""
    box = f"(assert (and (<= 0.0 kappa) (<= kappa {lit(k)})))\n"
    if len(stages) == 1:
        u, dd = stages[0]
        return (header("QF_NRA", comment) + "(declare-const kappa Real)\n(declare-const D Real)\n" + box
                + f"(assert (and (<= 0.0 D) (<= D {lit(dd)})))\n"
                + f"(assert (> (* {lit(c)} kappa D D {lit(u)}) {lit(eps)}))\n(check-sat)\n")
    n = range(len(stages))
    terms = " ".join(f"(* {lit(u)} D{i} D{i})" for i, (u, _) in enumerate(stages))
    return (header("QF_NRA", comment) + "(declare-const kappa Real)\n"
            + "".join(f"(declare-const D{i} Real)\n" for i in n) + box
            + "".join(f"(assert (and (<= 0.0 D{i}) (<= D{i} {lit(stages[i][1])})))\n" for i in n)
            + f"(assert (> (* {lit(c)} kappa (+ {terms})) {lit(eps)}))\n(check-sat)\n")


def smt_monotonicity():
    return (header("NRA", "monotonicity of c kappa D^2 u in kappa and D")
            + "(assert (not (forall ((c Real) (u Real) (k Real) (k2 Real) (D Real) (D2 Real))\n"
            + "  (=> (and (> c 0.0) (> u 0.0) (<= 0.0 k) (<= k k2) (<= 0.0 D) (<= D D2))\n"
            + "      (<= (* c k D D u) (* c k2 D2 D2 u))))))\n(check-sat)\n")


def smt_suffix(eps, suffix, half_k, ss, rho, target):
    n = len(eps)
    out = [header("QF_LRA", "suffix composition across layers (docs/design.md 2.5)")]
    out += [f"(declare-const z{i} Real)\n" for i in range(n + 1)] + ["(declare-const phi Real)\n", "(assert (= z0 0.0))\n"]
    out += [f"(assert (<= z{i + 1} (+ z{i} (* {lit(suffix[i])} {lit(eps[i])}))))\n" for i in range(n)]
    out.append(f"(assert (<= {lit(ss)} (* {lit(rho)} {lit(rho)})))\n")
    out.append(f"(assert (<= phi (+ z{n} (* {lit(half_k)} {lit(ss)}))))\n")
    out.append(f"(assert (> phi {lit(target)}))\n(check-sat)\n")
    return "".join(out)


def smt_kl(phi, gain, max_kl):
    return (header("QF_NRA", "KL budget of every token (docs/design.md 2.6)")
            + "(declare-const h Real)\n(declare-const z Real)\n"
            + f"(assert (and (<= 0.0 h) (<= h {lit(phi)})))\n"
            + f"(assert (and (<= 0.0 z) (<= z (* {lit(gain)} h))))\n"
            + f"(assert (> (/ (* z z) 8.0) {lit(max_kl)}))\n(check-sat)\n")


def smt_composition(inj, ls, st, target):
    n = len(inj)
    out = [header("QF_LRA", "composition law across layers (docs/design.md 2.5)")]
    out += [f"(declare-const e{i} Real)\n" for i in range(n + 1)]
    out.append("(assert (= e0 0.0))\n")
    for i in range(n):
        out.append(f"(assert (and (<= 0.0 e{i + 1}) (<= e{i + 1} (+ (* {lit(ls[i])} e{i}) "
                   f"(* {lit(st)} {lit(inj[i])})))))\n")
    out.append(f"(assert (> e{n} {lit(target)}))\n(check-sat)\n")
    return "".join(out)
