"""Fuzz the gate: `hnfverify check`'s plan loader and decisions, and `hnfverify recheck`, against an
independent oracle (tests/oracle.py: stdlib only, written from docs/design.md).

Deterministic (seeded). Plan cases come from generators (printed per generator in the histogram):
  random-json, random-bytes   structure-aware mutations of a planner plan (bit flips, truncation,
                              huge/negative/non-finite/float numbers, wrong types, removed or
                              duplicated keys, deep nesting, reordered layers, last-place nudges)
  kv-lengths                  K/V sink/recent lengths that disagree (with each other, with $.rule)
  windows                     empty and tiny windows: recent 0, sink 0, recent 1, sink + recent = T
  channel-groups              channel-grouped rest formats, groups that divide analysis.channel_group or not,
                              sinks that are not a multiple of the group, channel formats where the
                              cache writes one token at a time, per-token groups != head_dim
  domain                      amax near and above 65504 (fp16, int*, fp8*: FP16 values, zero-points,
                              scales), chains whose widened amax crosses it, bf16 far beyond it
  inconsistent                q_max below qnorm, Lipschitz value below measured x margin, margin < 1,
                              c / tau / o_proj_norm / eps / eps_target = 0, mode label edits,
                              explicit rest lengths (0, right, wrong), broken blocks
  threshold                   eps exactly at / one step above / one step below the largest
                              Theorem 5.7 rhs, the largest E_h; eps_target at e_L; claims at the
                              recomputed bounds; amax exactly at the domain edge
  blocks                      per-position overrides with their own inputs and formats
  mlp                         the product composition form with random rest-of-block gains, eps_target at e_L
  suffix                      the suffix form (§2.5) with random S_l, K, rho, Gamma: eps_target at Phi, max_kl at
                              the KL bound, rho at the injected errors, claims at their bounds; wrong-form fields
For every plan case: no traceback and no exit 4 (CLI sampled); the oracle decides the same bytes:
  FALSE PROVED   the gate PROVES what the oracle finds invalid or false (fatal);
  disagreements  the gate rejects a valid plan, refutes a true one, decides an invalid one, or its
                 obligation set differs from the document's (reported with examples, not fatal).
A sample of PROVED plans is certified (with SMT) and must be CONFIRMED by recheck.
Certificate cases: random mutations of a genuine certificate, and edits that keep the self-hash
valid (SMT text and the lemma dropped, a verdict flipped, a family dropped, a witness number
changed, assumptions emptied, versions changed, a certificate re-bound to a neighbouring plan ...).
recheck must never CONFIRM any of them; a confirmed one that the oracle finds wrong (invalid plan,
false or missing obligation, false witness, assumptions not the plan's) is reported as such.

Prints a verdict histogram per generator and overall, the share of plan cases decided (>= 30%
required) and the cases within one step of a threshold; exits 1 on any fatal failure (the inputs
are saved to --save).

    python tests/fuzz_gate.py --cases 100000          # make fuzz
    python tests/fuzz_gate.py --seconds 120           # the CI slice
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import random
import resource
import sys
import tempfile
import time
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import oracle  # noqa: E402

FATAL = ("traceback", "exit-4", "false-proved", "recheck-rejects-genuine", "cert-confirmed-wrong",
         "cert-confirmed-edited", "oracle-crash", "cli-disagrees")


# ============================================================================ base plans
def _synthetic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mp", HERE / "data" / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary, arrays = mod.synthetic_report(3)
    summary["shape"]["positions"] = 64
    return summary, arrays


def base_plan() -> dict:
    """The 3-layer, 2-head plan the random mutators start from (as before)."""
    from hnfverify.planning import PlanRequest, plan_from_report

    summary, arrays = _synthetic()
    plan = plan_from_report(summary, arrays, PlanRequest(eps=Fraction(50), sink=4, recent=8, max_seq_len=24))
    plan["eps_target"] = "1E+12"
    return plan


SMALL = [
    dict(eps=Fraction(50), sink=4, recent=8, max_seq_len=24),
    dict(eps=Fraction(50), sink=0, recent=8, max_seq_len=16),
    dict(eps=Fraction(50), sink=1, recent=0, max_seq_len=12),
    dict(avg_bits=Fraction(6), sink=4, recent=8, max_seq_len=20),
    dict(uniform="int8_t16,K.rest=int4_c8,V.rest=int4_t16", sink=1, recent=8, max_seq_len=24),
    dict(uniform="int4_t16,K.rest=int4_c8", sink=4, recent=0, max_seq_len=20),
    dict(eps=Fraction(50), eps_target=Fraction(10 ** 9), sink=1, recent=16, max_seq_len=30),
    dict(uniform="fp16", sink=4, recent=8, max_seq_len=16),
    dict(uniform="int8_t16,rest=int4_c8", sink=0, recent=8, max_seq_len=33),
]


def trim(plan: dict, n_layers: int, n_heads: int) -> dict:
    """Keep the first layers and KV heads. The planner's claims stay upper bounds (fewer terms;
    every lipschitz value >= 1)."""
    q = copy.deepcopy(plan)
    g = q["shape"]["query_heads"] // q["shape"]["kv_heads"]
    q["layers"] = q["layers"][:n_layers]
    for la in q["layers"]:
        la["heads"] = la["heads"][:n_heads]
    q["shape"].update(layers=n_layers, kv_heads=n_heads, query_heads=n_heads * g)
    for k in ("layer_bounds", "attention_error_max"):
        q["claims"][k] = q["claims"][k][:n_layers]
    used = {s["format"] for la in q["layers"] for h in la["heads"] for kv in "KV"
            for s in (h[kv]["sink"], h[kv]["recent"], h[kv]["rest"])}
    q["formats"] = {k: v for k, v in q["formats"].items() if k in used}
    return q


def small_plans() -> list:
    from hnfverify.planning import PlanRequest, plan_from_report

    summary, arrays = _synthetic()
    out = []
    for i, kw in enumerate(SMALL):
        full = plan_from_report(summary, arrays, PlanRequest(**kw))
        for nl, nh in ((1, 1), (2, 1), (1, 2)):
            out.append((f"v{i}-{nl}x{nh}", trim(full, nl, nh)))
    return out


def fmt_json(name: str) -> dict:
    return oracle.format_def(name)["entry"]


# ============================================================================ helpers on plans
def streams(p):
    for la in p["layers"]:
        for h in la["heads"]:
            for kv in ("K", "V"):
                yield la, h, kv, h[kv]


def segs_of(rule):
    return (rule["sink"], rule["recent"], rule["rest"])


def add_format(p, name):
    p["formats"][name] = fmt_json(name)


def dec_up(x: Fraction, sig: int = 12) -> str:
    """A decimal >= x (x > 0) with ``sig`` significant digits."""
    if x <= 0:
        return "0"
    e = len(str(x.numerator // x.denominator)) if x >= 1 else -len(str(x.denominator // max(1, x.numerator)))
    scale = Fraction(10) ** (sig - e)
    m = -((-x.numerator * scale.numerator) // (x.denominator * scale.denominator))
    return oracle.canon(Fraction(m) / scale)


def reclaim(p, how="up"):
    """Claims after an edit: the oracle's bounds rounded up ("up"), null ("null"), or left ("keep")."""
    if how == "keep":
        return p
    cl = p["claims"]
    n = len(p["layers"])
    if how == "null":
        cl["layer_bounds"], cl["attention_error_max"], cl["end_to_end_bound"] = [None] * n, [None] * n, None
        cl["logit_bound"] = cl["kl_bound"] = None
        return p
    res = oracle.decide(p)
    if not res.valid:
        return reclaim(p, "null")
    v = res.values

    def up(r):
        if r.hi is None or r.hi > Fraction(10) ** 290:
            return None
        return dec_up(r.hi * (1 + Fraction(1, 10 ** 7)))
    cl["layer_bounds"] = [up(b["doc"]) for b in v["b"]]
    cl["attention_error_max"] = [up(e["doc"]) for e in v["E_max"]]
    cl["end_to_end_bound"] = up(v["e_L"]["doc"])
    cl["logit_bound"], cl["kl_bound"] = up(v["Z"]["doc"]), up(v["KL"]["doc"])
    return p


def as_product(p):
    """The product composition form (§2.5): no suffix inputs, no claims about the logits."""
    p["composition"] = {"form": "product", "remainder": None, "logit_gain": None}
    for la in p["layers"]:
        la["suffix"] = None
    p["max_kl"] = None
    p["claims"]["logit_bound"] = p["claims"]["kl_bound"] = None
    return p


def set_lengths(p, s, r, rng, rest_len="auto"):
    """Set sink/recent lengths everywhere consistently; give newly non-empty segments inputs."""
    t = p["max_seq_len"]
    p["rule"] = {"sink": s, "recent": r}
    for _, _, _, rule in streams(p):
        rule["sink"]["length"], rule["recent"]["length"] = s, r
        lens = {"sink": s, "recent": r, "rest": t - s - r}
        donors = [rule[x]["inputs"] for x in ("rest", "recent", "sink") if rule[x]["inputs"] is not None]
        for seg in ("sink", "recent", "rest"):
            if lens[seg] > 0 and rule[seg]["inputs"] is None:
                rule[seg]["inputs"] = copy.deepcopy(donors[0])
            elif lens[seg] == 0 and rng.random() < 0.5:
                rule[seg]["inputs"] = None
        if rest_len == "auto":
            if rng.random() < 0.5:
                rule["rest"]["length"] = max(0, t - s - r)
            else:
                rule["rest"].pop("length", None)
    return p


def nudge(x: Fraction, rng, rel=Fraction(1, 10 ** 12)) -> Fraction:
    return x * (1 + rng.choice([-1, 1]) * rel)


# ============================================================================ random mutators (as before)
NUMBER_SUBST = ["1E+99999", "-1", "NaN", "Infinity", "1e400", "0", "0/1", "1/0", "", "1.5.5", "9" * 3000,
                "1E-400", "12345678901234567890/3", "-0", "0.000000000000000000000000000000001", "1e300", "1e301",
                "65504", "65505", "1/3", "1\n", "\u0661", "1_000", "0x10", "1E+400", "1E+401", "1.", ".5", "-1/3",
                "01", "+1", " 1", "1e5", "2/4", "1E-300", "9E-301"]
VALUE_SUBST = [None, True, 0, -1, 1.5, [], {}, "x", [[[[[[]]]]]], {"a": {"b": {"c": []}}}, 10 ** 30, "\ud800",
               "\u0000", 2 ** 63, -0]


def _paths(obj, prefix=()):
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    if isinstance(obj, list) and path[-1] >= len(obj):
        return
    obj[path[-1]] = value


def mutate_json(obj: dict, rng: random.Random) -> bytes:
    o = copy.deepcopy(obj)
    paths = [p for p, _ in _paths(o) if p]
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        path = rng.choice(paths)
        kind = rng.random()
        try:
            if kind < 0.35:
                _set(o, path, rng.choice(NUMBER_SUBST))
            elif kind < 0.6:
                _set(o, path, rng.choice(VALUE_SUBST))
            elif kind < 0.75:
                parent = o
                for p in path[:-1]:
                    parent = parent[p]
                if isinstance(parent, dict):
                    parent.pop(path[-1], None)
                elif isinstance(parent, list) and parent:
                    parent.pop(min(path[-1], len(parent) - 1))
            elif kind < 0.85:
                layers = o.get("layers")
                if isinstance(layers, list) and len(layers) > 1:
                    i, j = rng.randrange(len(layers)), rng.randrange(len(layers))
                    layers[i], layers[j] = layers[j], layers[i]
            else:
                parent = o
                for p in path[:-1]:
                    parent = parent[p]
                cur = parent[path[-1]] if not isinstance(parent, list) or path[-1] < len(parent) else None
                if isinstance(cur, str) and rng.random() < 0.7:
                    try:                          # nudge a number by one unit in its last place
                        f = Fraction(cur)
                        _set(o, path, str(f + Fraction(rng.choice([-1, 1]), 10 ** 12)))
                    except (ValueError, ZeroDivisionError):
                        pass
                else:
                    _set(o, path, {"nested": [cur]})
        except (KeyError, IndexError, TypeError):
            continue
    try:
        text = json.dumps(o, sort_keys=True, indent=1)
    except TypeError:                                       # a dict that got an integer key: unsorted
        text = json.dumps(o, indent=1)
    if rng.random() < 0.1:                                  # duplicate a key at top level
        text = text.replace('"c":', '"c": "4", "c":', 1)
    return text.encode()


def mutate_bytes(b: bytes, rng: random.Random) -> bytes:
    b = bytearray(b)
    kind = rng.random()
    if kind < 0.4:
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind < 0.55:
        del b[rng.randrange(len(b)):]
    elif kind < 0.7:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.choice([b"{", b"[", b'"', b"\x00", b"\xff", b"1e999", b",", b"]]]]"]))
    elif kind < 0.85:
        i = rng.randrange(len(b))
        del b[i:i + rng.randrange(1, 64)]
    else:
        b = bytearray(b"[" * rng.randrange(1000, 200000) + b)
    return bytes(b)


# ============================================================================ semantic generators
# each: (plan, rng) -> (plan, meta); meta["near"] marks a case within one step of a threshold
def gen_kv_lengths(p, rng):
    t = p["max_seq_len"]
    rules = list(streams(p))
    la, h, kv, rule = rng.choice(rules)
    k = rng.randrange(5)
    if k == 0:                                 # V (or K) sink differs from the other
        rule["sink"]["length"] = max(0, rule["sink"]["length"] + rng.choice([-1, 1]))
    elif k == 1:
        rule["recent"]["length"] = max(0, rule["recent"]["length"] + rng.choice([-1, 1]))
    elif k == 2:                               # $.rule alone differs
        p["rule"][rng.choice(["sink", "recent"])] += rng.choice([1, 2])
    elif k == 3:                               # K and V of a head swapped lengths (both change)
        s, r = rule["sink"]["length"], rule["recent"]["length"]
        other = h["V" if kv == "K" else "K"]
        other["sink"]["length"], other["recent"]["length"] = r, s
    else:                                      # a consistent change everywhere (valid): decided
        s = rng.randrange(0, min(6, t) + 1)
        r = rng.randrange(0, t - s + 1)
        set_lengths(p, s, r, rng)
        reclaim(p, rng.choice(["up", "up", "null"]))
    return p, {}


def gen_windows(p, rng):
    t = p["max_seq_len"]
    s0 = p["rule"]["sink"]
    choices = [(0, 0), (0, 1), (1, 0), (1, 1), (0, min(8, t)), (s0, 0), (s0, 1), (0, t), (t, 0), (min(s0, t - 1), 1),
               (0, t - 1), (t - 1, 1), (2, 2), (s0, t - s0)]
    s, r = rng.choice(choices)
    s, r = max(0, min(s, t)), max(0, r)
    if s + r > t:
        r = t - s
    set_lengths(p, s, r, rng)
    if r == 0 and rng.random() < 0.5:          # no recent stage: its format must not matter
        for _, _, kv, rule in streams(p):
            if rng.random() < 0.5:
                f = rng.choice(["int2_t16", "fp8_e5m2_t16", "int4_t16"])
                add_format(p, f)
                rule["recent"]["format"] = f
    if rng.random() < 0.08:                    # much longer sequences (states decided once, §5)
        t2 = rng.choice([97, 200, 4096, 10 ** 6, 10 ** 8])
        p["max_seq_len"] = t2
        for _, _, _, rule in streams(p):
            rule["rest"].pop("length", None)
            if rule["rest"]["inputs"] is None:
                rule["rest"]["inputs"] = copy.deepcopy(rule["recent"]["inputs"] or rule["sink"]["inputs"])
    elif rng.random() < 0.3:                   # shorter sequences
        t2 = rng.randrange(max(1, s + r), t + 1)
        p["max_seq_len"] = t2
        for _, _, _, rule in streams(p):
            if "length" in rule["rest"]:
                rule["rest"]["length"] = t2 - s - r
            if t2 - s - r == 0 and rng.random() < 0.5:
                rule["rest"]["inputs"] = None
    reclaim(p, rng.choice(["up", "up", "null"]))
    return p, {}


def gen_channel(p, rng):
    d = p["shape"]["head_dim"]
    cg = p["analysis"]["channel_group"]
    t = p["max_seq_len"]
    k = rng.random()
    if k < 0.55:                               # channel-grouped rest formats, aligned or not
        g = rng.choice([cg, cg, cg, 3, 4, 5, 16])
        if rng.random() < 0.5:
            p["analysis"]["channel_group"] = g      # consistent with the analysis
        for _, _, kv, rule in streams(p):
            if rng.random() < 0.7:
                f = f"int{rng.choice([8, 4, 3, 2])}_c{g}"
                add_format(p, f)
                rule["rest"]["format"] = f
        s = rng.choice([0, 1, 3, 4, 5, 7, 9, p["rule"]["sink"]])
        r = rng.choice([0, 1, 2, 3, 8, p["rule"]["recent"]])
        s = min(s, t)
        r = min(r, t - s)
        set_lengths(p, s, r, rng)
    elif k < 0.8:                              # channel formats where tokens are written one by one
        la, h, kv, rule = rng.choice(list(streams(p)))
        f = f"int{rng.choice([8, 4])}_c{cg}"
        add_format(p, f)
        where = rng.choice(["sink", "recent", "block"])
        if where == "block":
            inp = copy.deepcopy(rule["rest"]["inputs"] or rule["recent"]["inputs"] or rule["sink"]["inputs"])
            st = rng.randrange(0, t)
            rule["blocks"] = [{"start": st, "end": min(t, st + rng.choice([1, 2, 8])), "format": f, "inputs": inp}]
        else:
            rule[where]["format"] = f
    else:                                      # a per-token group other than head_dim
        la, h, kv, rule = rng.choice(list(streams(p)))
        f = rng.choice([f"int4_t{d // 2}", f"fp8_e4m3_t{d * 2}", f"int8_t{d + 1}", f"int4_t{d}"])
        add_format(p, f)
        rule[rng.choice(["sink", "recent", "rest"])]["format"] = f
    reclaim(p, rng.choice(["up", "null"]))
    return p, {}


DOMAIN_FORMATS = ["fp16", "int8_t16", "int4_t16", "int2_t16", "fp8_e4m3_t16", "fp8_e5m2_t16", "bf16", "fp32"]


def gen_domain(p, rng):
    la, h, kv, rule = rng.choice(list(streams(p)))
    t = p["max_seq_len"]
    segs = [s for s in ("sink", "recent", "rest") if rule[s]["inputs"] is not None and
            {"sink": rule["sink"]["length"], "recent": rule["recent"]["length"],
             "rest": t - rule["sink"]["length"] - rule["recent"]["length"]}[s] > 0]
    if not segs:
        return p, {}
    seg = rng.choice(segs)
    f = rng.choice(DOMAIN_FORMATS)
    add_format(p, f)
    rule[seg]["format"] = f
    if rng.random() < 0.5 and seg != "sink":       # the other stage of the chain too
        g = rng.choice(DOMAIN_FORMATS)
        add_format(p, g)
        rule["recent" if seg == "rest" else "rest"]["format"] = g
    edge = Fraction(65504)
    near = False
    k = rng.randrange(7)
    if k == 0:
        amax = edge                                      # exactly at the edge: in the domain
        near = True
    elif k == 1:
        amax = edge + Fraction(1, 2 ** 30)               # one step above
        near = True
    elif k == 2:
        amax = edge - Fraction(1, 2 ** 30)               # one step below (a chain's widening may cross)
        near = True
    elif k == 3:
        amax = edge * rng.choice([Fraction(1, 2), Fraction(99, 100), Fraction(101, 100), 2, 10])
    elif k == 4:
        amax = Fraction(rng.choice([10 ** 6, 10 ** 30, 448 * 65504, 57344 * 65504]))
    elif k == 5:                                          # the chain's widening crosses 65504
        amax = edge - Fraction(rng.choice([1, 10, 1000])) / 10
    else:
        amax = Fraction(10) ** 300
    for s in (seg,) if rng.random() < 0.7 else ("sink", "recent", "rest"):
        inp = rule[s]["inputs"]
        if inp is None:
            continue
        inp["amax"] = ["0", oracle.canon(amax)]
        if rng.random() < 0.5:                            # consistent diameters (per-token: <= 2 sqrt(d) amax)
            inp["d_token"] = ["0", oracle.canon(amax * 2 * 4)]
            inp["d_channel"] = ["0", oracle.canon(amax * 2 * 4)]
    if kv == "K" and rng.random() < 0.7:                  # isolate the domain from Theorem 5.7
        for s in ("sink", "recent", "rest"):
            if rule[s]["inputs"] is not None:
                rule[s]["inputs"]["kappa"] = ["0", "0"]
    p["eps_source"] = "implied" if p["mode"]["kind"] != "eps" else p["eps_source"]
    reclaim(p, "null")
    p["eps_target"] = None
    return p, {"near": near}


def gen_inconsistent(p, rng):
    la, h, kv, rule = rng.choice(list(streams(p)))
    k = rng.randrange(16)
    near = False
    if k == 0:                                  # q_max at / below a segment's qnorm
        ups = [Fraction(s["inputs"]["qnorm"][1]) for s in segs_of(h["K"]) + segs_of(h["V"]) if s["inputs"]]
        top = max(ups)
        h["q_max"] = oracle.canon(rng.choice([top, top - Fraction(1, 10 ** 12), top / 2, top + 1]))
        near = True
    elif k in (1, 2):                           # Lipschitz / mlp Lipschitz value vs measured x margin
        lk = "lipschitz" if k == 1 else "mlp_lipschitz"
        lip = la[lk]
        prod = Fraction(lip["measured"]) * Fraction(lip["margin"])
        lip["value"] = oracle.canon(rng.choice([prod, prod - Fraction(1, 10 ** 15), prod * Fraction(9, 10), prod * 2]))
        near = True
    elif k in (3, 4):                           # margins around 1
        lk = "lipschitz" if k == 3 else "mlp_lipschitz"
        lip = la[lk]
        m = rng.choice([Fraction(1), 1 - Fraction(1, 10 ** 12), Fraction(1, 2), Fraction(0)])
        lip["margin"] = oracle.canon(m)
        if rng.random() < 0.7:
            lip["value"] = oracle.canon(Fraction(lip["measured"]) * max(m, Fraction(1)))
        near = m in (1, 1 - Fraction(1, 10 ** 12))
    elif k == 5:
        p["c"] = rng.choice(["0", "0/7", "0.0", "1E-300", "4"])
    elif k == 6:
        la["tau"] = rng.choice(["0", "0.000", "1E-300"])
    elif k == 7:
        h["o_proj_norm"] = rng.choice(["0", "0/3", "1E-300"])
    elif k == 8:
        p["eps"] = rng.choice(["0", "0.0"])
    elif k == 9:
        p["eps_target"] = rng.choice(["0", "1E-300", None, "1E+300"])
    elif k == 10:                               # mode labels
        p["mode"]["kind"] = rng.choice(["eps", "avg_bits", "uniform", "assigned"])
        p["eps_source"] = rng.choice(["user", "implied"])
    elif k == 11:                               # explicit rest lengths
        t = p["max_seq_len"]
        want = t - rule["sink"]["length"] - rule["recent"]["length"]
        rule["rest"]["length"] = rng.choice([0, want, want + 1, max(0, want - 1)])
    elif k == 12:                               # blocks out of order / overlapping / empty / beyond T
        t = p["max_seq_len"]
        inp = copy.deepcopy(rule["rest"]["inputs"] or rule["sink"]["inputs"] or rule["recent"]["inputs"])
        f = rule["rest"]["format"] if oracle.format_def(rule["rest"]["format"])["gran"] != "channel" else "fp16"
        add_format(p, f)
        a = rng.randrange(0, t)
        kinds = [[(a, a)], [(a, a + 1), (a, a + 1)], [(a, min(t, a + 2)), (max(0, a - 1), a)], [(a, t + 1)],
                 [(max(0, a - 1), a), (a, min(t, a + 1))]]
        rule["blocks"] = [{"start": x, "end": y, "format": f, "inputs": copy.deepcopy(inp)}
                          for x, y in rng.choice(kinds)]
    elif k == 13:                               # lo > hi in an interval
        seg = rng.choice([s for s in segs_of(rule) if s["inputs"]] or [None])
        if seg:
            key = rng.choice(oracle.INPUT_KEYS)
            lo, hi = seg["inputs"][key]
            seg["inputs"][key] = [hi, lo] if Fraction(lo) != Fraction(hi) else [oracle.canon(Fraction(hi) + 1), hi]
    elif k == 14:                               # layers / heads out of order or missing
        if rng.random() < 0.5 and len(p["layers"]) > 1:
            p["layers"][0]["layer"], p["layers"][1]["layer"] = 1, 0
        else:
            h["kv_head"] = h["kv_head"] + 1
    else:                                       # a format table entry edited
        name = rng.choice(sorted(p["formats"]))
        fld = rng.choice(["u", "bits_per_element", "group", "error_model", "value_bits"])
        v = p["formats"][name][fld]
        p["formats"][name][fld] = (v + 1 if isinstance(v, int) else "1/2" if fld == "u" else v + " ")
    return p, {"near": near}


def gen_threshold(p, rng):
    """eps (or eps_target, a claim, an amax) exactly at, one step above or one step below the bound."""
    res = oracle.decide(p)
    if not res.valid:
        return p, {}
    k = rng.randrange(5)
    step = rng.choice([0, 1, -1])
    if k <= 1:                                  # the largest Theorem 5.7 rhs (precision)
        obs = [o for o in res.obligations.values() if o.family == "precision-lower-bound" and o.sim and o.doc
               and o.detail["kappa"] > 0]
        if not obs:
            return p, {}
        o = max(obs, key=lambda o: o.detail["rhs"].lo)
        rhs = o.detail["rhs"]
        if rhs.exact:
            eps = rhs.lo + step * Fraction(1, 10 ** 40) * max(rhs.lo, 1)
            if step == -1:
                eps = rhs.lo - rhs.lo / 10 ** 30
        else:
            eps = rhs.lo * (1 + step * Fraction(1, 10 ** 9))
        p["eps"] = oracle.canon(eps) if len(oracle.canon(eps)) < 1900 else dec_up(eps, 60)
        p["eps_source"], p["mode"]["kind"] = "implied", rng.choice(["avg_bits", "uniform", "assigned"])
        p["eps_target"] = None
        reclaim(p, "null")
        return p, {"near": True, "what": f"eps at {o.id} rhs, step {step}"}
    if k == 2:                                  # the largest E_h (attention budget)
        e = max((x["doc"] for x in res.values["E"].values()), key=lambda r: r.lo)
        if e.hi is None:
            return p, {}
        eps = e.lo * (1 + step * Fraction(1, 10 ** 9))
        p["eps"] = dec_up(eps, 40) if step >= 0 else oracle.canon(oracle.rdown(eps, 100))
        p["eps_source"] = "user"
        for _, _, _, rule in streams(p):             # keep Theorem 5.7 out of the way
            for s in segs_of(rule):
                if s["inputs"] is not None:
                    s["inputs"]["kappa"] = ["0", "0"]
        reclaim(p, "null")
        return p, {"near": True, "what": f"eps at max E_h, step {step}"}
    if k == 3:                                  # eps_target at e_L
        e = res.values["e_L"]["doc"]
        if e.hi is None:
            return p, {}
        tgt = e.lo * (1 + step * Fraction(1, 10 ** 9))
        p["eps_target"] = dec_up(tgt, 40) if step >= 0 else oracle.canon(oracle.rdown(tgt, 100))
        return p, {"near": True, "what": f"eps_target at e_L, step {step}"}
    # a claim at the recomputed bound
    v = res.values
    which = rng.choice(["layer_bounds", "attention_error_max", "end_to_end_bound"])
    li = rng.randrange(len(p["layers"]))
    if which == "end_to_end_bound":
        val = v["e_L"]["doc"]
    else:
        val = (v["b"] if which == "layer_bounds" else v["E_max"])[li]["doc"]
    if val.hi is None:
        return p, {}
    x = val.lo * (1 + step * Fraction(1, 10 ** 9))
    s = dec_up(x, 40) if step >= 0 else oracle.canon(oracle.rdown(x, 100))
    if which == "end_to_end_bound":
        p["claims"][which] = s
    else:
        p["claims"][which][li] = s
    return p, {"near": True, "what": f"claim {which} at the bound, step {step}"}


def gen_blocks(p, rng):
    t = p["max_seq_len"]
    la, h, kv, rule = rng.choice(list(streams(p)))
    d = p["shape"]["head_dim"]
    blocks = []
    a = 0
    for _ in range(rng.choice([1, 1, 2, 3])):
        a = rng.randrange(a, t) if a < t else t - 1
        b = min(t, a + rng.choice([1, 1, 2, 4, t]))
        f = rng.choice(["fp16", "fp32", f"int8_t{d}", f"int4_t{d}", f"int2_t{d}", f"fp8_e4m3_t{d}"])
        add_format(p, f)
        inp = copy.deepcopy(rng.choice([s["inputs"] for s in segs_of(rule) if s["inputs"]]))
        if rng.random() < 0.4:
            inp["amax"] = ["0", rng.choice(["1000", "70000", "0.5"])]
            inp["d_token"] = ["0", rng.choice(["8000", "1", "100"])]
        if rng.random() < 0.3:
            inp["kappa"] = ["0", rng.choice(["0", "10", "1E-6"])]
        blocks.append({"start": a, "end": b, "format": f, "inputs": inp})
        a = b
        if a >= t:
            break
    rule["blocks"] = blocks
    reclaim(p, rng.choice(["up", "null", "keep"]))
    return p, {}


def gen_mass(p, rng):
    """V's attention masses above K's (A_sigma, B_sigma take the larger, §2.4); V's kappa ignored."""
    la, h, kv, rule = rng.choice(list(streams(p)))
    k = rng.randrange(3)
    for seg in ("sink", "recent", "rest"):
        vi, ki = h["V"][seg]["inputs"], h["K"][seg]["inputs"]
        if vi is None or ki is None:
            continue
        if k == 0:
            for key in ("mass_alpha", "mass_avo"):
                vi[key] = ["0", oracle.canon(Fraction(ki[key][1]) * rng.choice([2, 10, 100]))]
        elif k == 1:
            for key in ("mass_alpha", "mass_avo"):
                ki[key] = ["0", oracle.canon(Fraction(vi[key][1]) * rng.choice([2, 10]))]
        else:
            vi["kappa"] = ["0", rng.choice(["1E+6", "1000", "0"])]      # kappa_hi = 0 for values
    near = False
    if rng.random() < 0.7:                   # eps just below / above the true E_h: mass must be counted
        for _, _, _, r2 in streams(p):
            for sg in segs_of(r2):
                if sg["inputs"] is not None and r2 is h["K"]:
                    sg["inputs"]["kappa"] = ["0", "0"]
        res = oracle.decide(reclaim(p, "null"))
        if res.valid:
            e = res.values["E"][(la["layer"], h["kv_head"])]["doc"]
            if e.hi is not None:
                step = rng.choice([1, -1])
                eps = e.lo * (1 + step * Fraction(1, 10 ** 6))
                for _, _, _, r2 in streams(p):
                    for sg in segs_of(r2):
                        if sg["inputs"] is not None:
                            sg["inputs"]["kappa"] = ["0", "0"]
                p["eps"], p["eps_source"] = dec_up(eps, 30), "user"
                near = True
    reclaim(p, rng.choice(["up", "null"]))
    return p, {"near": near}


def gen_mlp(p, rng):
    """The rest of each block (mlp_lipschitz, §2.5, product form) in the composition law, eps_target at e_L."""
    if p.get("composition", {}).get("form") == "suffix" and rng.random() < 0.9:
        as_product(p)
    for la in p["layers"]:
        if rng.random() < 0.7:
            meas = rng.choice([Fraction(1, 2), Fraction(1), Fraction(3), Fraction(10), Fraction(123456789, 10 ** 8)])
            marg = rng.choice([Fraction(1), Fraction(11, 10), Fraction(2)])
            la["mlp_lipschitz"] = {"measured": oracle.canon(meas), "margin": oracle.canon(marg),
                                   "value": oracle.canon(meas * marg * rng.choice([1, 1, 2]))}
        if rng.random() < 0.3:
            lip = la["lipschitz"]
            lip["value"] = oracle.canon(Fraction(lip["value"]) * rng.choice([1, 3]))
    res = oracle.decide(reclaim(p, "null"))
    if not res.valid:
        return p, {}
    e = res.values["e_L"]["doc"]
    if e.hi is None:
        return p, {}
    step = rng.choice([1, -1, 0])
    tgt = e.lo * (1 + step * Fraction(1, 10 ** 9))
    p["eps_target"] = dec_up(tgt, 40) if step >= 0 else oracle.canon(oracle.rdown(tgt, 100))
    reclaim(p, rng.choice(["up", "null"]))
    return p, {"near": True}


def gen_suffix(p, rng):
    """The suffix form and the KL budget (§2.5, §2.6): random S_l, K, rho, Gamma (and margins), then
    eps_target at Phi, max_kl at the KL bound, rho at the injected errors' norm, or a claim at its bound,
    exactly, one step above or one step below; sometimes the fields of the wrong form."""
    if p.get("composition", {}).get("form") != "suffix":
        return p, {}

    def gain(meas, marg, mult=1):
        return {"measured": oracle.canon(meas), "margin": oracle.canon(marg), "value": oracle.canon(meas * marg * mult)}

    for la in p["layers"]:
        if rng.random() < 0.7:
            la["suffix"] = gain(rng.choice([Fraction(1, 3), Fraction(1), Fraction(7), Fraction(123457, 1000)]),
                                rng.choice([Fraction(1), Fraction(2)]), rng.choice([1, 1, 3]))
    comp = p["composition"]
    if rng.random() < 0.7:
        comp["remainder"] = dict(gain(rng.choice([Fraction(0), Fraction(1, 1000), Fraction(5)]),
                                      rng.choice([Fraction(1), Fraction(2)])),
                                 radius=oracle.canon(rng.choice([Fraction(10) ** 6, Fraction(10) ** 3, Fraction(1)])))
    if rng.random() < 0.5:
        comp["logit_gain"] = gain(rng.choice([Fraction(1, 10), Fraction(3), Fraction(15)]), Fraction(1))
    k = rng.randrange(7)
    if k == 6:                                  # fields of the other form: invalid
        what = rng.choice(["suffix", "remainder", "gain", "form"])
        if what == "suffix":
            p["layers"][rng.randrange(len(p["layers"]))]["suffix"] = None
        elif what == "remainder":
            comp["remainder"] = None
        elif what == "gain":
            comp["logit_gain"] = None
        else:
            comp["form"] = "product"
        return reclaim(p, "null"), {}
    res = oracle.decide(reclaim(p, "null"))
    if not res.valid:
        return p, {}
    step = rng.choice([0, 1, -1])
    if k == 0:                                  # rho at sqrt(sum eps_l^2): inside / outside the ball
        eps2 = Fraction(0)
        for b in res.values["b"]:
            x = b["doc"]
            if x.hi is None:
                return p, {}
            eps2 += x.hi * x.hi * p["max_seq_len"]
        rho = oracle.rsqrt(eps2).hi * (1 + step * Fraction(1, 10 ** 9))
        comp["remainder"]["radius"] = dec_up(rho, 30)
        p["eps_target"] = "1E+300"
        return reclaim(p, rng.choice(["up", "null"])), {"near": True, "what": f"radius at the errors, step {step}"}
    if k in (1, 2):                             # eps_target at Phi
        e = res.values["e_L"]["doc"]
        if e.hi is None:
            return p, {}
        tgt = e.lo * (1 + step * Fraction(1, 10 ** 9))
        p["eps_target"] = dec_up(tgt, 40) if step >= 0 else oracle.canon(oracle.rdown(tgt, 100))
        return reclaim(p, rng.choice(["up", "null"])), {"near": True, "what": f"eps_target at Phi, step {step}"}
    if k in (3, 4):                             # max_kl at the KL bound
        kl = res.values["KL"]["doc"]
        if kl.hi is None or kl.lo == 0:
            return p, {}
        mk = kl.lo * (1 + step * Fraction(1, 10 ** 9))
        p["max_kl"] = dec_up(mk, 40) if step >= 0 else oracle.canon(oracle.rdown(mk, 100))
        return reclaim(p, rng.choice(["up", "null"])), {"near": True, "what": f"max_kl at the KL bound, step {step}"}
    which, key = rng.choice([("logit_bound", "Z"), ("kl_bound", "KL"), ("end_to_end_bound", "e_L")])
    val = res.values[key]["doc"]
    reclaim(p, "up")
    if val.hi is None:
        return p, {}
    x = val.lo * (1 + step * Fraction(1, 10 ** 9))
    p["claims"][which] = dec_up(x, 40) if step >= 0 else oracle.canon(oracle.rdown(x, 100))
    return p, {"near": True, "what": f"claim {which} at the bound, step {step}"}


def gen_chains(p, rng):
    """Recent-then-rest chains: Theorem 5.7 on every stage's widened ranges (§2.2, §2.3), the domain of
    the second stage on amax + e_1; eps or amax one step either side."""
    t = p["max_seq_len"]
    if p["rule"]["recent"] == 0 or t - p["rule"]["sink"] - p["rule"]["recent"] <= 0:
        set_lengths(p, rng.choice([0, 1, 4]), rng.choice([1, 2, 8]), rng)
    la, h, kv, rule = rng.choice(list(streams(p)))
    f1 = rng.choice(["int2_t16", "int3_t16", "int4_t16", "fp8_e5m2_t16", "fp16", "int8_t16"])
    f2 = rng.choice(["fp16", "int8_t16", "fp8_e4m3_t16", "bf16", "int4_t16"])
    cg = p["analysis"]["channel_group"]
    if rng.random() < 0.3:
        f2 = f"int{rng.choice([8, 4])}_c{cg}"
    for f in (f1, f2):
        add_format(p, f)
    rule["recent"]["format"], rule["rest"]["format"] = f1, f2
    near = False
    if rng.random() < 0.5 and rule["rest"]["inputs"] is not None:   # the widened amax crosses 65504
        inp = rule["rest"]["inputs"]
        fd = [oracle.format_def(f1)]
        dt, dc = Fraction(inp["d_token"][1]), Fraction(inp["d_channel"][1])
        e1 = oracle.chain_value(fd, dt, dc, Fraction(65504), None, None, p["shape"]["head_dim"], 0)["error"]
        amax = Fraction(65504) - e1.lo * rng.choice([Fraction(1, 2), Fraction(2)])
        if amax > 0:
            inp["amax"] = ["0", oracle.canon(oracle.rdown(amax, 80))]
            near = True
        reclaim(p, "null")
        p["eps_target"] = None
        p["eps_source"] = "implied" if p["mode"]["kind"] != "eps" else "user"
        return p, {"near": near}
    res = oracle.decide(reclaim(p, "null"))
    if not res.valid:
        return p, {}
    chains = [o for o in res.obligations.values() if o.family == "precision-lower-bound" and o.sim and o.doc
              and len(o.detail["chain"]["stages"]) > 1 and o.detail["kappa"] > 0]
    if chains:
        o = rng.choice(chains)
        step = rng.choice([1, -1])
        eps = o.detail["rhs"].lo * (1 + step * Fraction(1, 10 ** 9))
        p["eps"] = dec_up(eps, 40)
        p["eps_source"], p["mode"]["kind"], p["eps_target"] = "implied", "assigned", None
        near = True
    return p, {"near": near}


SEMANTIC = {"kv-lengths": gen_kv_lengths, "windows": gen_windows, "channel-groups": gen_channel,
            "domain": gen_domain, "inconsistent": gen_inconsistent, "threshold": gen_threshold,
            "blocks": gen_blocks, "kv-mass": gen_mass, "mlp": gen_mlp, "chains": gen_chains, "suffix": gen_suffix}
WEIGHTS = {"kv-lengths": 1, "windows": 2, "channel-groups": 2, "domain": 2, "inconsistent": 2, "threshold": 3,
           "blocks": 1, "kv-mass": 1, "mlp": 1, "chains": 2, "suffix": 2}


# ============================================================================ certificate edits
def reseal(cert: dict) -> dict:
    from hnfverify.core import recheck

    body = {k: v for k, v in cert.items() if k != "certificate_sha256"}
    cert["certificate_sha256"] = hashlib.sha256(recheck.canonical(body)).hexdigest()
    return cert


def recount(cert):
    fams = Counter(o["family"] for o in cert["obligations"])
    if isinstance(cert.get("summary"), dict):
        cert["summary"]["obligations"] = len(cert["obligations"])
        cert["summary"]["by_family"] = dict(sorted(fams.items()))
    return cert


def _num_paths(obj, prefix=()):
    for path, v in _paths(obj, prefix):
        if isinstance(v, str) and oracle.is_num(v) and len(v) < 200:
            yield path, v


def edit_certificate(cert: dict, plan: dict, rng, neighbours) -> tuple:
    """A hash-preserving edit: (edit name, cert, plan) — the plan may be a neighbour re-bound to."""
    c = copy.deepcopy(cert)
    obs = c["obligations"]
    kind = rng.choice(["drop-smt-lemma", "drop-smt-one", "flip-verdict", "drop-family", "drop-one", "witness",
                       "assumptions", "versions", "summary", "rebind", "duplicate", "rename", "solver",
                       "location", "top-verdict", "extra", "smt-text"])
    if kind == "drop-smt-lemma":
        for o in obs:
            o.pop("smt2", None)
        c["obligations"] = [o for o in obs if o["id"] != "lemma/monotonicity"]
        recount(c)
    elif kind == "drop-smt-one":
        cand = [o for o in obs if "smt2" in o]
        if cand:
            rng.choice(cand).pop("smt2")
    elif kind == "flip-verdict":
        o = rng.choice(obs)
        o["verdict"] = rng.choice(["REFUTED", "UNKNOWN"])
    elif kind == "drop-family":
        fam = rng.choice(sorted({o["family"] for o in obs}))
        c["obligations"] = [o for o in obs if o["family"] != fam]
        recount(c)
    elif kind == "drop-one":
        obs.pop(rng.randrange(len(obs)))
        if rng.random() < 0.7:
            recount(c)
    elif kind == "witness":
        o = rng.choice([o for o in obs if o.get("witness")] or obs)
        paths = list(_num_paths(o.get("witness", {})))
        if paths:
            path, v = rng.choice(paths)
            x = Fraction(v)
            new = rng.choice([x * (1 + Fraction(1, 10 ** 6)), x * (1 - Fraction(1, 10 ** 6)), Fraction(0),
                              x + Fraction(1, 10 ** 30), x / 2, x * 2])
            _set(o["witness"], path, oracle.canon(new))
    elif kind == "assumptions":
        m = c["assumptions"]["measured"]
        k = rng.randrange(3)
        if k == 0 or not m:
            c["assumptions"]["measured"] = []
        elif k == 1:
            m.pop(rng.randrange(len(m)))
        else:
            a = rng.choice(m)
            a["value"] = oracle.canon(Fraction(a["value"]) / 2) if oracle.is_num(a["value"]) else "1"
        if rng.random() < 0.3:
            c["assumptions"]["kernel"] = {}
    elif kind == "versions":
        tool = c.get("tool", {})
        key = rng.choice(sorted(tool) or ["z3"])
        tool[key] = rng.choice(["0.0.1", "99.0", None, "4.8.0", ""])
        kind = f"versions-{key}"
    elif kind == "summary":
        s = c.get("summary", {})
        key = rng.choice(sorted(s) or ["obligations"])
        v = s.get(key)
        if isinstance(v, int):
            s[key] = v + 1
        elif isinstance(v, str) and oracle.is_num(v):
            s[key] = oracle.canon(Fraction(v) / 2)
        else:
            s[key] = [] if isinstance(v, list) else {} if isinstance(v, dict) else 0
    elif kind == "rebind":
        name, q = rng.choice(neighbours)
        from hnfverify.core.plan import plan_sha256

        c["plan"]["sha256"] = plan_sha256(q)
        return f"rebind-{name}", reseal(c), q
    elif kind == "duplicate":
        obs.append(copy.deepcopy(rng.choice(obs)))
        recount(c)
    elif kind == "rename":
        o = rng.choice(obs)
        o["id"] = o["id"].replace("/H0", "/H1") if "/H0" in o["id"] else o["id"] + "x"
    elif kind == "solver":
        c["solver"]["timeout_ms"] = c["solver"].get("timeout_ms", 1) + 1 if rng.random() < 0.5 else 0
        if rng.random() < 0.5:
            c["solver"]["name"] = "cvc5" if c["solver"].get("name") == "z3" else "z3"
    elif kind == "location":
        o = rng.choice(obs)
        o["location"] = {} if rng.random() < 0.5 else dict(o.get("location", {}), layer=99)
    elif kind == "top-verdict":
        c["verdict"] = rng.choice(["REFUTED", "UNKNOWN", "proved"])
    elif kind == "extra":
        o = copy.deepcopy(rng.choice(obs))
        o["id"] = rng.choice(["precision/L0/H0/K/recent-far", "precision/L9/H0/K/rest", "attention/L0/H7", "claims2"])
        obs.append(o)
        recount(c)
    else:
        cand = [o for o in obs if "smt2" in o]
        if cand:
            o = rng.choice(cand)
            o["smt2"] = o["smt2"].replace("(check-sat)", "(assert true)\n(check-sat)")
    return kind, reseal(c), plan


# ============================================================================ the run
class Run:
    def __init__(self, args):
        self.args = args
        self.hist = defaultdict(Counter)              # generator -> outcome counts
        self.fail = []                                  # (category, generator, data, why)
        self.disagree = defaultdict(list)               # category -> examples
        self.disagree_n = Counter()
        self.counts = Counter()
        self.findings = set()

    def record(self, cat, gen, data, why):
        if cat in FATAL:
            self.fail.append((cat, gen, data, why))
        else:
            self.disagree_n[cat] += 1
            if len(self.disagree[cat]) < 3:
                self.disagree[cat].append((gen, data, why))


def gate_decide(data: bytes, opts):
    """('exit2', msg) | ('traceback', repr) | (verdict, result, plan)."""
    from hnfverify.errors import HnfError
    from hnfverify.core.plan import loads
    from hnfverify.core.verify.obligations import check_plan

    try:
        p = loads(data)
    except HnfError as e:
        return "exit2", str(e).splitlines()[-1][:300], None
    except Exception as e:                                 # noqa: BLE001 - this is what we hunt
        return "traceback", f"loads: {e!r}", None
    try:
        r = check_plan(p, opts)
    except HnfError as e:
        return "exit2", str(e).splitlines()[-1][:300], p
    except Exception as e:                                 # noqa: BLE001
        return "traceback", f"check_plan: {e!r}", p
    return r.verdict(), r, p


def oracle_decide(data: bytes):
    try:
        plan = oracle.load(data)
    except oracle.OracleInputError as e:
        return None, str(e)
    return plan, oracle.decide(plan)


def compare(run: Run, gen: str, data: bytes, meta: dict, opts, sample_cert: bool):
    gv, gres, gplan = gate_decide(data, opts)
    try:
        oplan, ores = oracle_decide(data)
    except Exception as e:                                 # noqa: BLE001 - the oracle's own bug
        run.record("oracle-crash", gen, data, repr(e))
        run.hist[gen]["oracle-crash"] += 1
        return
    ov = "INVALID" if oplan is None or not ores.valid else ores.sound
    run.hist[gen][f"gate {gv if gv != 'exit2' else 'exit 2'}"] += 1
    run.hist[gen][f"oracle {ov}"] += 1
    if meta.get("near"):
        run.hist[gen]["near-threshold"] += 1
        run.hist[gen][f"near {gv} / {ov}"] += 1
    if oplan is not None and ores.valid:
        run.findings.update(x for x in ores.findings if "SOUNDNESS" in x)
    if gv == "traceback":
        run.record("traceback", gen, data, gres)
        return
    reason = ores.reason if oplan is not None and not isinstance(ores, str) else ores
    if gv == "PROVED":
        if ov == "INVALID":
            run.record("false-proved", gen, data, f"gate PROVED an invalid plan: {reason}")
            return
        if ores.sound == "REFUTED":
            bad = [o.id for o in ores.failing("sim")]
            run.record("false-proved", gen, data, f"gate PROVED; oracle: false {bad[:6]}")
            return
        if ores.doc == "REFUTED":
            run.record("gate-proves-doc-refuted", gen, data, str([o.id for o in ores.failing("doc")][:6]))
    if gv == "exit2" and ov != "INVALID":
        where = gres.strip().split(":")[0].strip()
        sub = ("table entry" if where.startswith("$.formats") else "exp cap" if "exp(" in gres else
               "number range" if "range" in gres else "JSON level" if where.startswith("plan '") else
               where.split("[")[0])
        run.record(f"gate-rejects-valid ({sub})", gen, data, gres)
    if gv in ("PROVED", "REFUTED", "UNKNOWN") and ov == "INVALID":
        run.record("gate-decides-invalid", gen, data, f"gate {gv}; oracle: {reason}")
    if gv == "REFUTED" and ov != "INVALID" and ores.doc == "PROVED":
        bad = [o.id for o in gres.obligations if o.verdict == "REFUTED"]
        run.record("gate-refutes-true", gen, data, f"gate refutes {bad[:6]}")
    if gv in ("PROVED", "REFUTED") and ov != "INVALID":
        gids = {o.id: o.verdict for o in gres.obligations if o.family != "lemma"}
        oids = {o.id: o.holds for k, o in ores.obligations.items() if o.doc and not k.endswith("#doc")}
        oids.update({o.id: o.holds for k, o in ores.obligations.items() if k.endswith("#doc")})
        miss, extra = sorted(set(oids) - set(gids)), sorted(set(gids) - set(oids))
        if miss or extra:
            run.record("obligation-set-differs", gen, data, f"missing in gate {miss[:4]}, extra in gate {extra[:4]}")
        for oid in set(gids) & set(oids):
            if gids[oid] == "PROVED" and oids[oid] is False:
                run.record("obligation-proved-false", gen, data, oid)
            elif gids[oid] == "REFUTED" and oids[oid] is True:
                run.record("obligation-refuted-true", gen, data, oid)
    if gv == "PROVED" and sample_cert:
        certify_and_recheck(run, gen, data, gplan)


def certify_and_recheck(run, gen, data, plan):
    from hnfverify.core import recheck
    from hnfverify.core.plan import dumps, plan_sha256
    from hnfverify.core.verify import PROVED, certificate
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    opts = CheckOptions(wall_timeout_s=60)
    run.counts["certified"] += 1
    try:
        r = check_plan(plan, opts)
        if r.verdict() != PROVED:
            run.record("smt-disagrees", gen, data, f"exact PROVED, with SMT {r.verdict()}")
            return
        c = certificate.serialize(certificate.build(plan, plan_sha256(plan), "plan.json", r, opts))
    except Exception as e:                                 # noqa: BLE001
        run.record("traceback", gen, data, f"certify: {e!r}")
        return
    code, msg = recheck.decide(c, dumps(plan))
    if code != 0:
        run.record("recheck-rejects-genuine", gen, data, msg)


def cli_case(run, gen, data, tmp, gv):
    from hnfverify.cli import run as cli_run

    run.counts["cli_cases"] += 1
    f = tmp / "p.json"
    f.write_bytes(data)
    out, err = io.StringIO(), io.StringIO()
    code = cli_run(["check", str(f), "--cert-dir", str(tmp / "certs"), "--wall-timeout", "60"], out, err)
    text = err.getvalue()
    if code not in (0, 1, 2, 3) or "Traceback" in text or "internal error" in text:
        run.record("exit-4" if code == 4 else "traceback", gen, data, text[-500:])
        return
    want = {"PROVED": 0, "REFUTED": 1, "exit2": 2, "UNKNOWN": 3}.get(gv)
    if want is not None and code != want and not (want == 0 and code == 3):
        run.record("cli-disagrees", gen, data, f"in-process {gv}, CLI exit {code}: {out.getvalue()[-300:]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100000)
    ap.add_argument("--seconds", type=float, default=None, help="stop after this much wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cli-every", type=int, default=500, help="also run the CLI (with z3) every N cases")
    ap.add_argument("--cert-every", type=int, default=100,
                    help="certify (with z3) and recheck every N-th PROVED plan case")
    ap.add_argument("--save", default="fuzz-failures")
    ap.add_argument("--memory-mib", type=int, default=2048, help="address-space limit: memory stays bounded")
    ap.add_argument("--progress", type=int, default=0, help="print a line every N cases")
    ap.add_argument("--only", default=None, help="comma-separated generator names (plan cases only)")
    args = ap.parse_args()
    lim = args.memory_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    from hnfverify.core import recheck
    from hnfverify.core.plan import dumps, plan_sha256
    from hnfverify.core.verify import PROVED, certificate
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    t_setup = time.time()
    big = base_plan()
    big_bytes = dumps(big)
    opts = CheckOptions(smt=False)
    smt_opts = CheckOptions(wall_timeout_s=60)
    assert check_plan(big, opts).verdict() == PROVED, "the base plan must be PROVED"
    smalls = [(n, p) for n, p in small_plans() if check_plan(p, opts).verdict() == PROVED]
    assert len(smalls) >= 10, [n for n, _ in small_plans()]
    pool = []                                            # genuine certificates (with SMT) of small plans
    for name, p in [("big", big)] + smalls[::3]:
        r = check_plan(p, smt_opts)
        assert r.verdict() == PROVED, name
        cb = certificate.serialize(certificate.build(p, plan_sha256(p), "plan.json", r, smt_opts))
        code, msg = recheck.decide(cb, dumps(p))
        if code != 0:
            print(f"fuzz: genuine certificate of {name} REJECTED by recheck: {msg}")
        pool.append((name, p, json.loads(cb), cb, code == 0))
    rng = random.Random(args.seed)
    neighbours = {}
    for name, p, _, _, _ in pool:                        # plans near each pooled one, to re-bind to
        ns = []
        for g in ("threshold", "threshold", "inconsistent", "windows", "domain"):
            q, _ = SEMANTIC[g](copy.deepcopy(p), random.Random(f"{name}{g}{len(ns)}"))
            ns.append((g, q))
        neighbours[name] = ns
    only = set(args.only.split(",")) if args.only else None
    gens = [g for g in SEMANTIC for _ in range(WEIGHTS[g]) if only is None or g in only]
    print(f"fuzz: setup {time.time() - t_setup:.1f} s, {len(smalls)} small plans, {len(pool)} certificates",
          flush=True)

    run = Run(args)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp())
    proved_seen = 0
    n = 0
    for n in range(args.cases):
        if args.seconds is not None and time.time() - t0 > args.seconds:
            break
        if args.progress and n % args.progress == 0:
            print(f"  ... {n} cases, {len(run.fail)} failures, {time.time() - t0:.0f} s", flush=True)
        run.counts["cases"] += 1
        if n % 2 == 0 or only:                           # a plan case
            run.counts["plan_cases"] += 1
            x = rng.random()
            meta = {}
            if x < 0.45 and not only:
                base = big if rng.random() < 0.2 else rng.choice(smalls)[1]
                if rng.random() < 0.7:
                    gen, data = "random-json", mutate_json(base, rng)
                else:
                    gen, data = "random-bytes", mutate_bytes(dumps(base), rng)
            else:
                gen = rng.choice(gens)
                p = copy.deepcopy(rng.choice(smalls)[1])
                try:
                    p, meta = SEMANTIC[gen](p, rng)
                except Exception as e:                   # noqa: BLE001 - a generator bug: report it
                    run.record("oracle-crash", gen, b"", f"generator: {e!r}")
                    continue
                data = dumps(p) if rng.random() < 0.97 else json.dumps(p).encode()
            gv = None
            if args.cli_every and run.counts["plan_cases"] % max(1, args.cli_every // 2) == 0:
                gv = gate_decide(data, opts)[0]
                cli_case(run, gen, data, tmp, gv)
            sample = False
            before = run.hist[gen]["gate PROVED"]
            compare(run, gen, data, meta, opts, sample_cert=False)
            if run.hist[gen]["gate PROVED"] > before:
                proved_seen += 1
                sample = args.cert_every and proved_seen % args.cert_every == 0
            if sample:
                certify_and_recheck(run, gen, data, json.loads(data))
        else:                                            # a certificate case
            run.counts["cert_cases"] += 1
            name, p, cert, cb, genuine_ok = rng.choice(pool)
            kind = "random"
            if rng.random() < 0.5:
                gen = "cert-random"
                data = mutate_bytes(cb, rng) if rng.random() < 0.6 else mutate_json(cert, rng)
                if data == cb:
                    continue
                plan_bytes, plan = dumps(p), p
            else:
                kind, c2, plan = edit_certificate(cert, p, rng, neighbours[name])
                gen = "cert-edit"
                data = certificate.serialize(c2)
                if data == cb:
                    continue
                plan_bytes = dumps(plan)
                run.hist[gen][f"edit {kind.split('-')[0] if kind.startswith(('rebind', 'versions')) else kind}"] += 1
            code, msg = recheck.decide(data, plan_bytes)
            run.hist[gen]["CONFIRMED" if code == 0 else "REJECTED"] += 1
            if code == 0 and kind.startswith("rebind") and not oracle.check_certificate(json.loads(data), plan):
                run.hist[gen]["CONFIRMED rebind (body equals the neighbour's)"] += 1
            elif code == 0:
                try:
                    why = oracle.check_certificate(json.loads(data), plan)
                except Exception as e:                   # noqa: BLE001
                    why = [f"(oracle could not read it: {e!r})"]
                if why:
                    run.record("cert-confirmed-wrong", gen, data, f"({kind}) " + "; ".join(why[:4]))
                elif kind == "solver":           # options of the run, not derivable from the plan
                    run.record("cert-confirmed-solver-options", gen, data, f"solver options edited: {msg}")
                elif kind.startswith("versions-") and kind != "versions-hnfverify":
                    # §6 "rejects versions that differ": recheck compares its own version only; the
                    # solver's, numpy's and python's are recorded, not verified (reported, not fatal)
                    run.record("cert-confirmed-foreign-version", gen, data, f"tool.{kind[9:]} edited: {msg}")
                else:
                    run.record("cert-confirmed-edited", gen, data, f"§6: an edited certificate ({kind}) was confirmed: "
                               + msg)
        if run.fail and len(run.fail) != run.counts.get("_saved", 0):
            _save(args.save, run.fail[len(run.fail) - 1:], run.counts.get("_saved", 0))
            run.counts["_saved"] = len(run.fail)
    return report(run, time.time() - t0)


def _save(d, items, offset):
    d = Path(d)
    d.mkdir(exist_ok=True)
    for i, (cat, gen, data, why) in enumerate(items[:50]):
        k = offset + i
        (d / f"{k:03d}-{cat}-{gen}.bin").write_bytes(data)
        (d / f"{k:03d}-{cat}-{gen}.txt").write_text(why)


def report(run: Run, seconds: float) -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = Counter()
    print("fuzz: verdict histogram per generator (gate: exit 2 = rejected input; oracle: INVALID/PROVED/"
          "REFUTED/UNDECIDABLE)")
    for gen in sorted(run.hist):
        h = run.hist[gen]
        total.update(h)
        print(f"  {gen:15s} " + ", ".join(f"{k} {v}" for k, v in sorted(h.items())))
    plan_total = sum(v for k, v in total.items() if k.startswith("gate "))
    decided = total["gate PROVED"] + total["gate REFUTED"]
    near = total["near-threshold"]
    near_dec = sum(v for k, v in total.items() if k.startswith("near PROVED") or k.startswith("near REFUTED"))
    print("  overall         " + ", ".join(f"{k} {v}" for k, v in sorted(total.items()) if not k.startswith("near ")))
    share = decided / plan_total if plan_total else 0.0
    print(f"fuzz: {decided} of {plan_total} plan cases decided (PROVED or REFUTED): {100 * share:.1f}%; "
          f"{near} within one step of a threshold ({near_dec} of them decided by the gate)")
    c = run.counts
    print(f"fuzz: cases {c['cases']}, plan_cases {c['plan_cases']}, cert_cases {c['cert_cases']}, "
          f"cli_cases {c['cli_cases']}, certified {c['certified']}, seconds {seconds:.1f}, peak_rss_mib {peak:.1f}")
    for cat in sorted(run.disagree_n):
        print(f"fuzz: disagreement {cat}: {run.disagree_n[cat]}")
        for i, (gen, data, why) in enumerate(run.disagree[cat]):
            print(f"    [{gen}] {why[:400]}")
            d = Path(run.args.save) / "disagreements"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{cat}-{i}-{gen}.bin").write_bytes(data)
            (d / f"{cat}-{i}-{gen}.txt").write_text(why)
    for f in sorted(run.findings)[:10]:
        print(f"fuzz: DOC FINDING {f}")
    fatal = Counter(cat for cat, _, _, _ in run.fail)
    print("fuzz: " + ", ".join(f"{k} {fatal.get(k, 0)}" for k in FATAL))
    ok = True
    if run.fail:
        _save(run.args.save, run.fail, 0)
        print(f"fuzz: {len(run.fail)} FAILURES (first inputs saved in {run.args.save}/)")
        for cat, gen, data, why in run.fail[:10]:
            print(f"    {cat} [{gen}] {why[:400]}")
        ok = False
    if plan_total >= 200 and share < 0.30 and not run.args.only:
        print("fuzz: FAILURE: fewer than 30% of the plan cases reached PROVED or REFUTED")
        ok = False
    if ok:
        print("fuzz: 0 tracebacks, 0 false PROVED, 0 wrong or edited certificates confirmed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
