"""Generate the adversarial corpus: one small plan per class of docs/design.md §3 (plan validity) and
§4 (run-time states), and per class of the gate fuzzer (tests/fuzz_gate.py), each with the
`hnfverify check` exit code the document implies and the independent oracle's verdict
(tests/oracle.py). `python tests/data/make_adversarial.py` rewrites tests/data/adversarial/ byte for
byte; tests/core/verify/test_adversarial.py checks every file against the gate and the oracle.

Plans start from the synthetic report of tests/data/make_planted.py (one or two layers, one KV head,
short max_seq_len). A class whose expected exit code is what the document implies but not (yet) what
the gate answers carries "gate_differs": the reason (the test expects the gate to differ, strictly, so
that the entry is revisited when the gate changes).

MANIFEST.json entries: file, class, section, expect_exit (0 PROVED, 1 REFUTED, 2 invalid), oracle
(the oracle's verdict by the document: PROVED | REFUTED | INVALID), note, and optionally
oracle_reachable_only (its verdict over the states the simulated cache really reaches, where that
differs: the document is more conservative there) and gate_differs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

import oracle  # noqa: E402

OUT = HERE / "adversarial"
EXIT_OF = {"PROVED": 0, "REFUTED": 1, "INVALID": 2}


def _synthetic():
    spec = importlib.util.spec_from_file_location("mp", HERE / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary, arrays = mod.synthetic_report(0)
    return summary, arrays


_SUMMARY = None


def planner(n_layers=1, n_heads=1, **kw):
    """A planner plan trimmed to the first layers and KV heads (its claims stay upper bounds)."""
    global _SUMMARY
    from hnfverify.planning import PlanRequest, plan_from_report

    if _SUMMARY is None:
        _SUMMARY = _synthetic()
    kw.setdefault("sink", 4)
    kw.setdefault("recent", 8)
    kw.setdefault("max_seq_len", 16)
    if not any(k in kw for k in ("eps", "avg_bits", "uniform")):
        kw["eps"] = Fraction(50)
    p = plan_from_report(*_SUMMARY, PlanRequest(**kw))
    g = p["shape"]["query_heads"] // p["shape"]["kv_heads"]
    p["layers"] = p["layers"][:n_layers]
    for la in p["layers"]:
        la["heads"] = la["heads"][:n_heads]
    p["shape"].update(layers=n_layers, kv_heads=n_heads, query_heads=n_heads * g)
    for k in ("layer_bounds", "attention_error_max"):
        p["claims"][k] = p["claims"][k][:n_layers]
    used = {s["format"] for la in p["layers"] for h in la["heads"] for kv in "KV"
            for s in (h[kv]["sink"], h[kv]["recent"], h[kv]["rest"])}
    p["formats"] = {k: v for k, v in p["formats"].items() if k in used}
    return p


def fmt(p, name):
    p["formats"][name] = oracle.format_def(name)["entry"]
    return name


def null_claims(p):
    n = len(p["layers"])
    p["claims"]["layer_bounds"], p["claims"]["attention_error_max"] = [None] * n, [None] * n
    p["claims"]["end_to_end_bound"] = p["claims"]["logit_bound"] = p["claims"]["kl_bound"] = None
    return p


def up_claims(p):
    """Claims just above the oracle's bounds (upper bounds by one part in 1e7)."""
    res = oracle.decide(p)
    assert res.valid, res.reason

    def up(r):
        x = r.hi * (1 + Fraction(1, 10 ** 7))
        return oracle.canon(oracle.rup(x, 40))
    p["claims"]["layer_bounds"] = [up(b["doc"]) for b in res.values["b"]]
    p["claims"]["attention_error_max"] = [up(e["doc"]) for e in res.values["E_max"]]
    p["claims"]["end_to_end_bound"] = up(res.values["e_L"]["doc"])
    for key, val in (("logit_bound", "Z"), ("kl_bound", "KL")):
        r = res.values[val]["doc"]
        p["claims"][key] = None if r.hi is None else up(r)
    return p


def head(p, li=0, h=0):
    return p["layers"][li]["heads"][h]


def streams(p):
    for la in p["layers"]:
        for h in la["heads"]:
            for kv in ("K", "V"):
                yield h[kv]


def set_lengths(p, s, r):
    t = p["max_seq_len"]
    p["rule"] = {"sink": s, "recent": r}
    for rule in streams(p):
        rule["sink"]["length"], rule["recent"]["length"] = s, r
        rule["rest"].pop("length", None)
        donor = next(rule[x]["inputs"] for x in ("rest", "recent", "sink") if rule[x]["inputs"] is not None)
        for seg, n in (("sink", s), ("recent", r), ("rest", t - s - r)):
            if n > 0 and rule[seg]["inputs"] is None:
                rule[seg]["inputs"] = copy.deepcopy(donor)
            if n == 0:
                rule[seg]["inputs"] = None
    return p


def kappa0(p):
    for rule in streams(p):
        for seg in ("sink", "recent", "rest"):
            if rule[seg]["inputs"] is not None:
                rule[seg]["inputs"]["kappa"] = ["0", "0"]
    return p


# ============================================================================ classes
CASES = []


def case(name, section, expect, note, gate_differs=None):
    def deco(fn):
        CASES.append((name, section, expect, note, gate_differs, fn))
        return fn
    return deco


# ---- controls
@case("control-eps", "§5", 0, "the planner's eps plan, trimmed: every obligation holds")
def _c1():
    return planner()


@case("control-channel-rest", "§4", 0, "a channel-grouped K rest (int4_c8), sink 1 (not a multiple of G = 8)")
def _c2():
    return planner(uniform="int8_t16,K.rest=int4_c8", sink=1, max_seq_len=24)


# ---- §3 validity: exit 2
@case("format-entry-differs", "§3", 2, "a format table entry whose u differs from the format's definition")
def _v1():
    p = planner()
    name = sorted(p["formats"])[0]
    p["formats"][name]["u"] = "1/2"
    return p


@case("format-unknown", "§3", 2, "a segment names a format that does not exist (int5_t16)")
def _v2():
    p = planner()
    head(p)["K"]["rest"]["format"] = "int5_t16"
    return p


@case("layers-out-of-order", "§3", 2, "two layers swapped")
def _v3():
    p = planner(n_layers=2)
    p["layers"][0], p["layers"][1] = p["layers"][1], p["layers"][0]
    return p


@case("heads-missing", "§3", 2, "shape.kv_heads 2, one head listed")
def _v4():
    p = planner()
    p["shape"]["kv_heads"], p["shape"]["query_heads"] = 2, 4
    return p


@case("interval-lo-above-hi", "§3", 2, "an input interval with lo > hi")
def _v5():
    p = planner()
    inp = head(p)["K"]["rest"]["inputs"]
    inp["amax"] = [inp["amax"][1], inp["amax"][0]] if inp["amax"][0] != inp["amax"][1] else ["9", "1"]
    return p


@case("blocks-overlap", "§3", 2, "two blocks overlapping")
def _v6():
    p = planner()
    rule = head(p)["K"]
    inp = copy.deepcopy(rule["rest"]["inputs"])
    f = rule["rest"]["format"]
    rule["blocks"] = [{"start": 6, "end": 9, "format": f, "inputs": inp},
                      {"start": 8, "end": 10, "format": f, "inputs": copy.deepcopy(inp)}]
    return p


@case("blocks-unsorted", "§3", 2, "two blocks out of order")
def _v7():
    p = planner()
    rule = head(p)["K"]
    inp = copy.deepcopy(rule["rest"]["inputs"])
    f = rule["rest"]["format"]
    rule["blocks"] = [{"start": 10, "end": 11, "format": f, "inputs": inp},
                      {"start": 6, "end": 7, "format": f, "inputs": copy.deepcopy(inp)}]
    return p


@case("block-beyond-max-seq-len", "§3", 2, "a block ending after max_seq_len")
def _v7b():
    p = planner()
    rule = head(p)["V"]
    rule["blocks"] = [{"start": 15, "end": 17, "format": rule["rest"]["format"],
                       "inputs": copy.deepcopy(rule["rest"]["inputs"])}]
    return p


@case("kv-sink-mismatch", "§3", 2, "V's sink length differs from K's (and from $.rule)")
def _v8():
    p = planner()
    head(p)["V"]["sink"]["length"] = 3
    return p


@case("kv-recent-mismatch", "§3", 2, "K's recent length differs from V's (and from $.rule)")
def _v9():
    p = planner()
    head(p)["K"]["recent"]["length"] = 7
    return p


@case("rule-lengths-differ", "§3", 2, "every stream consistent, $.rule says another sink")
def _v10():
    p = planner()
    p["rule"]["sink"] = 1
    return p


@case("sink-plus-recent-above-T", "§3", 2, "sink + recent > max_seq_len")
def _v11():
    p = planner()
    p["max_seq_len"] = 11
    for rule in streams(p):
        rule["rest"].pop("length", None)
    return p


@case("rest-length-zero", "§3", 2, "an explicit rest length 0 where max_seq_len - sink - recent = 4")
def _v12():
    p = planner()
    head(p)["K"]["rest"]["length"] = 0
    return p


@case("rest-length-right", "§3", 0, "an explicit rest length equal to max_seq_len - sink - recent (valid)")
def _v12b():
    p = planner()
    for rule in streams(p):
        rule["rest"]["length"] = 4
    return p


@case("segment-without-inputs", "§3", 2, "a non-empty recent segment with inputs null")
def _v13():
    p = planner()
    head(p)["V"]["recent"]["inputs"] = None
    return p


@case("channel-format-in-sink", "§3", 2, "a channel-grouped format in the sink")
def _v14():
    p = planner()
    head(p)["K"]["sink"]["format"] = fmt(p, "int4_c8")
    return p


@case("channel-format-in-recent", "§3", 2, "a channel-grouped format in the recent window")
def _v15():
    p = planner()
    head(p)["K"]["recent"]["format"] = fmt(p, "int8_c8")
    return p


@case("channel-format-in-block", "§3", 2, "a channel-grouped format in a block")
def _v16():
    p = planner()
    rule = head(p)["K"]
    rule["blocks"] = [{"start": 13, "end": 14, "format": fmt(p, "int4_c8"),
                       "inputs": copy.deepcopy(rule["rest"]["inputs"])}]
    return p


@case("per-token-group-not-head-dim", "§3", 2, "int4_t8 in a per-token segment of a head_dim-16 model")
def _v17():
    p = planner()
    head(p)["V"]["rest"]["format"] = fmt(p, "int4_t8")
    return p


@case("channel-group-not-analysis", "§3", 2, "a rest format grouping 32 tokens over an analysis of groups of 8")
def _v18():
    p = planner(uniform="int8_t16,K.rest=int4_c8", sink=1, max_seq_len=24)
    head(p)["K"]["rest"]["format"] = fmt(p, "int4_c32")
    p["formats"].pop("int4_c8", None)
    return p


def _zero(field):
    def build():
        p = planner(eps_target=Fraction(10 ** 9))
        if field == "tau":
            p["layers"][0]["tau"] = "0"
        elif field == "o_proj_norm":
            head(p)["o_proj_norm"] = "0"
        else:
            p[field] = "0"
        return p
    return build


for _f in ("eps", "c", "tau", "o_proj_norm", "eps_target"):
    case(f"{_f.replace('_', '-')}-zero", "§3", 2, f"{_f} = 0 (must be > 0)")(_zero(_f))


@case("q-max-below-qnorm", "§3", 2, "q_max one part in 1e12 below a V segment's qnorm upper end")
def _v19():
    p = planner()
    top = Fraction(head(p)["V"]["rest"]["inputs"]["qnorm"][1])
    head(p)["q_max"] = oracle.canon(top * (1 - Fraction(1, 10 ** 12)))
    for rule in streams(p):
        for seg in ("sink", "recent", "rest"):
            if rule[seg]["inputs"] is not None:
                q = rule[seg]["inputs"]["qnorm"]
                if Fraction(q[1]) > top:
                    q[1] = oracle.canon(top)
                if Fraction(q[0]) > Fraction(q[1]):
                    q[0] = q[1]
    return p


@case("q-max-equals-qnorm", "§3", 0, "q_max exactly the largest qnorm upper end (valid)")
def _v19b():
    p = planner()
    top = max(Fraction(rule[seg]["inputs"]["qnorm"][1]) for rule in streams(p) for seg in ("sink", "recent", "rest")
              if rule[seg]["inputs"] is not None)
    head(p)["q_max"] = oracle.canon(top)
    return up_claims(p)


def _lip(key, what, ok):
    def build():
        p = planner()
        lip = p["layers"][0][key]
        meas = Fraction(lip["measured"])
        if what == "margin":
            lip["margin"] = "1" if ok else "0.999999999999"
            lip["value"] = oracle.canon(meas * (1 if ok else Fraction(999999999999, 10 ** 12)))
        else:
            prod = meas * Fraction(lip["margin"])
            lip["value"] = oracle.canon(prod if ok else prod - Fraction(1, 10 ** 15))
        return up_claims(p) if ok else p
    return build


for _k in ("lipschitz", "mlp_lipschitz"):
    for _w in ("margin", "value"):
        for _ok in (False, True):
            _n = f"{_k.replace('_', '-')}-{_w}-{'at-edge' if _ok else 'below'}"
            _why = "margin < 1" if _w == "margin" else "value < measured x margin"
            _note = (f"{_k}.{_w} exactly at its edge (margin 1 / value = measured x margin): valid" if _ok else
                     f"{_k}.{_w} one step below its edge ({_why})")
            case(_n, "§3", 0 if _ok else 2, _note)(_lip(_k, _w, _ok))


@case("mode-eps-implied", "§3", 2, "mode eps with eps_source implied")
def _v20():
    p = planner()
    p["eps_source"] = "implied"
    return p


@case("claims-length", "§3", 2, "claims.layer_bounds has one entry for two layers")
def _v21():
    p = planner(n_layers=2)
    p["claims"]["layer_bounds"] = p["claims"]["layer_bounds"][:1]
    return p


@case("float-literal", "§3", 2, "a JSON float literal instead of a number string")
def _v22():
    p = planner()
    return json.dumps(p, sort_keys=True, indent=1).replace('"c": "4"', '"c": 4.0', 1).encode()


@case("duplicate-key", "§3", 2, "a duplicated key")
def _v23():
    p = planner()
    return json.dumps(p, sort_keys=True, indent=1).replace('"c": "4"', '"c": "4", "c": "1000"', 1).encode()


# ---- §4 run-time states
@case("recent-0-straight-to-rest", "§4", 0, "R = 0: an INT2 recent format is never written; the FP32 rest is "
      "stored once (no recent stage in the chain)")
def _s1():
    p = planner(uniform="fp32", recent=0, eps=None)
    head(p)["K"]["recent"]["format"] = fmt(p, "int2_t16")
    return up_claims(p)


@case("sink-0", "§4", 0, "no sink: every position goes through the recent window")
def _s2():
    return planner(sink=0)


@case("recent-1", "§4", 0, "R = 1: no query reads a recent-format value at distance < R (no RECENT state)")
def _s3():
    p = set_lengths(planner(uniform="int8_t16"), 4, 1)
    return null_claims(p)


@case("rest-empty", "§4", 0, "sink + recent = max_seq_len: no rest, no recent-far")
def _s4():
    p = set_lengths(planner(), 4, 12)
    return up_claims(p)


@case("sink-not-multiple-of-group", "§4", 0, "channel rest, G = 8, sink 5: the group straddling S starts at S")
def _s5():
    p = set_lengths(planner(uniform="int8_t16,K.rest=int4_c8,V.rest=int8_c8", max_seq_len=24), 5, 2)
    return up_claims(p)


@case("channel-rest-recent-0", "§4", 0, "channel rest with R = 0: pending groups are exact until complete")
def _s6():
    p = planner(uniform="int4_t16,K.rest=int4_c8", recent=0, sink=1, max_seq_len=24)
    return up_claims(p)


@case("recent-far-checked", "§4", 1, "INT4 recent before a channel rest: far queries read pending positions in "
      "the recent format (RECENT_FAR) with the far kappa; near queries insensitive")
def _s7():
    p = planner(uniform="fp32,K.rest=int8_c8", eps=None)
    p["eps"] = "1/10000"
    p["eps_source"], p["mode"]["kind"] = "implied", "uniform"
    head(p)["K"]["recent"]["format"] = fmt(p, "int4_t16")
    head(p)["K"]["recent"]["inputs"]["kappa"] = ["0", "0"]
    return null_claims(p)


@case("rest-chain-checked", "§4", 1, "INT2 recent before an FP32 rest: the rest chain pays INT2's u")
def _s8():
    p = planner(uniform="fp32", eps=None)
    p["eps"] = "1/1000"
    p["eps_source"], p["mode"]["kind"] = "implied", "uniform"
    head(p)["K"]["recent"]["format"] = fmt(p, "int2_t16")
    head(p)["K"]["recent"]["inputs"]["kappa"] = ["0", "0"]
    return null_claims(p)


# ---- out-of-domain magnitudes (§2.3)
def _domain(f, amax, expect_ok, kv="V", seg="sink", chain_first=None):
    def build():
        p = planner(uniform="fp32", eps=None)
        p["eps_source"], p["mode"]["kind"], p["eps_target"] = "implied", "uniform", None
        rule = head(p)[kv]
        rule[seg]["format"] = fmt(p, f)
        if chain_first:
            rule["recent"]["format"] = fmt(p, chain_first)
        a = amax(rule, p) if callable(amax) else Fraction(amax)
        rule[seg]["inputs"]["amax"] = ["0", oracle.canon(a)]
        kappa0(p)
        return null_claims(p)
    return build


for _f in ("fp16", "int8_t16", "int2_t16", "fp8_e4m3_t16", "fp8_e5m2_t16"):
    case(f"domain-{_f}-above-65504", "§2.3", 1, f"{_f}: amax one step above 65504 (FP16 value / zero-point / scale "
         "outside the lemma's domain)")(_domain(_f, Fraction(65504) + Fraction(1, 2 ** 20), False))
    case(f"domain-{_f}-at-65504", "§2.3", 0, f"{_f}: amax exactly 65504 (inside the domain)")(
        _domain(_f, 65504, True))
case("domain-bf16-far-above-65504", "§2.3", 0, "bf16: amax 1e6 is inside its domain (largest finite ~3.4e38)")(
    _domain("bf16", 10 ** 6, True))


def _rotated_domain(amax_h, expect_ok):
    """int3_t16_h values of amax 30000 (inside 65504) whose rotation reaches amax_h (§2.3c)."""
    def build():
        p = _domain("int3_t16_h", 30000, expect_ok)()
        head(p)["V"]["sink"]["inputs"]["amax_h"] = ["0", oracle.canon(Fraction(amax_h))]
        return null_claims(p)
    return build


case("domain-rotated-above-65504", "§2.3c", 1, "int3_t16_h: amax 30000 inside the domain, but the rotated values' "
     "amax_h just above 65504 (the FP16 zero-point / scale of the rotated vector outside the lemma's domain)")(
    _rotated_domain(Fraction(65504) + Fraction(1, 2 ** 20), False))
case("domain-rotated-inside", "§2.3c", 0, "int3_t16_h: amax 30000, rotated amax_h 20000: inside the domain")(
    _rotated_domain(20000, True))
case("domain-rotated-implied", "§2.3c", 1, "int3_t16_h without a measured amax_h: amax 30000 implies only "
     "amax_h <= sqrt(16) 30000 = 120000, outside the domain")(_domain("int3_t16_h", 30000, False))


def _widened_amax(rule, p):
    f1 = oracle.format_def(rule["recent"]["format"])
    inp = rule["rest"]["inputs"]
    e1 = oracle.chain_value([f1], Fraction(inp["d_token"][1]), Fraction(inp["d_channel"][1]), Fraction(65504),
                            None, None, p["shape"]["head_dim"], 0)["error"]
    return oracle.rdown(Fraction(65504) - e1.lo / 2, 60)


case("domain-widened-chain", "§2.3", 1, "INT4 recent then FP16 rest: amax just below 65504, the rest stage's "
     "widened amax (amax + e_1) above it", )(_domain("fp16", _widened_amax, False, seg="rest", chain_first="int4_t16"))


# ---- thresholds (§2.2, §2.4, §2.5, §5.5)
def _precision_threshold(step):
    def build():
        p = planner(recent=0)              # one-stage chains only: every rhs is an exact rational
        p["eps_source"], p["mode"]["kind"], p["eps_target"] = "implied", "assigned", None
        null_claims(p)
        res = oracle.decide(p)
        one = [o for o in res.obligations.values() if o.family == "precision-lower-bound" and o.sim and o.doc
               and o.detail["rhs"].exact and o.detail["kappa"] > 0]
        o = max(one, key=lambda o: o.detail["rhs"].lo)
        rhs = o.detail["rhs"].lo
        p["eps"] = oracle.canon(rhs + step * Fraction(1, 10 ** 40))
        return p
    return build


case("threshold-precision-at", "§2.2", 0, "eps exactly the largest one-stage c kappa D^2 u: holds (>=)")(
    _precision_threshold(0))
case("threshold-precision-below", "§2.2", 1, "eps 1e-40 below the largest one-stage rhs")(_precision_threshold(-1))


def _attention_threshold(step):
    def build():
        p = kappa0(planner())
        null_claims(p)
        res = oracle.decide(p)
        e = res.values["E"][(0, 0)]["doc"]
        p["eps"] = oracle.canon(oracle.rup(e.hi * (1 + Fraction(1, 10 ** 9)), 60) if step > 0 else
                                oracle.rdown(e.lo * (1 - Fraction(1, 10 ** 9)), 60))
        return p
    return build


case("threshold-attention-above", "§2.4", 0, "eps one part in 1e9 above E_h")(_attention_threshold(1))
case("threshold-attention-below", "§2.4", 1, "eps one part in 1e9 below E_h")(_attention_threshold(-1))


@case("mode-label-keeps-budget", "§5", 1, "eps below E_h, mode relabelled assigned: eps_source user still "
      "demands E_h <= eps")
def _t5():
    p = _attention_threshold(-1)()
    p["mode"]["kind"] = "assigned"
    return p


def _composition(step, mlp="1"):
    def build():
        p = planner(n_layers=2, composition="product")
        for la in p["layers"]:
            la["mlp_lipschitz"] = {"measured": mlp, "margin": "1", "value": mlp}
        null_claims(p)
        res = oracle.decide(p)
        e = res.values["e_L"]["doc"]
        p["eps_target"] = oracle.canon(oracle.rup(e.hi * (1 + Fraction(1, 10 ** 9)), 60) if step > 0 else
                                       oracle.rdown(e.lo * (1 - Fraction(1, 10 ** 9)), 60))
        return p
    return build


case("composition-above", "§2.5", 0, "eps_target one part in 1e9 above e_L (mlp_lipschitz 3)")(_composition(1, "3"))
case("composition-below", "§2.5", 1, "eps_target one part in 1e9 below e_L (mlp_lipschitz 3)")(_composition(-1, "3"))


@case("composition-ignores-mlp", "§2.5", 1, "eps_target above e_L without the rest of the block, below it with "
      "mlp_lipschitz 10")
def _t8():
    p = _composition(1, "1")()
    for la in p["layers"]:
        la["mlp_lipschitz"] = {"measured": "10", "margin": "1", "value": "10"}
    return p


def _suffix(step, key="e_L", target="eps_target"):
    def build():
        p = planner(n_layers=2)
        null_claims(p)
        e = oracle.decide(p).values[key]["doc"]
        p[target] = oracle.canon(oracle.rup(e.hi * (1 + Fraction(1, 10 ** 9)), 60) if step > 0 else
                                 oracle.rdown(e.lo * (1 - Fraction(1, 10 ** 9)), 60))
        return p
    return build


case("suffix-composition-above", "§2.5", 0, "suffix form: eps_target one part in 1e9 above Phi")(_suffix(1))
case("suffix-composition-below", "§2.5", 1, "suffix form: eps_target one part in 1e9 below Phi")(_suffix(-1))
case("kl-above", "§2.6", 0, "max_kl one part in 1e9 above the KL bound")(_suffix(1, "KL", "max_kl"))
case("kl-below", "§2.6", 1, "max_kl one part in 1e9 below the KL bound")(_suffix(-1, "KL", "max_kl"))


@case("suffix-outside-radius", "§2.5", 1, "suffix form, the injected errors outside the remainder's radius (rho "
      "1e-6): no end-to-end bound, eps_target 1e9 fails")
def _t_radius():
    p = planner(n_layers=2, eps_target=None)
    null_claims(p)
    p["composition"]["remainder"]["radius"] = "1E-6"
    p["eps_target"] = "1E+9"
    return p


@case("kl-with-product-form", "§2.6", 1, "max_kl with the product composition: no claim about the logits")
def _t_kl_product():
    p = planner(n_layers=2, composition="product")
    null_claims(p)
    p["max_kl"] = "1E+9"
    return p


@case("suffix-missing-layer", "§3", 2, "suffix form with one layer's suffix null")
def _t_suffix_null():
    p = planner(n_layers=2)
    p["layers"][1]["suffix"] = None
    return p


@case("suffix-below-margin", "§3", 2, "a suffix sensitivity below measured x margin")
def _t_suffix_margin():
    p = planner(n_layers=2)
    s = p["layers"][0]["suffix"]
    s["value"] = s["measured"]
    return p


@case("logit-claim-understated", "§5", 1, "claims.logit_bound one part in 1e6 below the recomputed bound")
def _t_logit_claim():
    p = planner(n_layers=2)
    null_claims(p)
    z = oracle.decide(p).values["Z"]["doc"]
    p["claims"]["logit_bound"] = oracle.canon(oracle.rdown(z.lo * (1 - Fraction(1, 10 ** 6)), 60))
    return p


@case("claims-understated", "§5", 1, "attention_error_max claimed 1e-20")
def _t9():
    p = planner()
    p["claims"]["attention_error_max"] = ["1E-20"]
    return p


@case("claims-at-bound", "§5", 0, "every claim one part in 1e7 above the recomputed bound")
def _t10():
    return up_claims(planner(eps_target=Fraction(10 ** 9)))


@case("kv-mass-max", "§2.4", 1, "V's attention masses 10x K's: A, B take the larger; eps between the K-only "
      "bound and the true one")
def _t11():
    p = kappa0(planner())
    for seg in ("sink", "recent", "rest"):
        vi, ki = head(p)["V"][seg]["inputs"], head(p)["K"][seg]["inputs"]
        for key in ("mass_alpha", "mass_avo"):
            vi[key] = ["0", oracle.canon(Fraction(ki[key][1]) * 10)]
    null_claims(p)
    e = oracle.decide(p).values["E"][(0, 0)]["doc"]
    p["eps"] = oracle.canon(oracle.rdown(e.lo * Fraction(9, 10), 60))
    return p


@case("values-kappa-ignored", "§5", 0, "V inputs with kappa 1e6: kappa_hi = 0 for values")
def _t12():
    p = planner()
    for seg in ("sink", "recent", "rest"):
        head(p)["V"][seg]["inputs"]["kappa"] = ["0", "1E+6"]
    return p


@case("block-own-inputs", "§4", 1, "a V block with large ranges read with its own inputs: the attention bound "
      "takes its error")
def _t13():
    p = planner()
    rule = head(p)["V"]
    inp = copy.deepcopy(rule["rest"]["inputs"])
    inp["amax"], inp["d_token"], inp["d_channel"] = ["0", "1000"], ["0", "8000"], ["0", "8000"]
    rule["blocks"] = [{"start": 13, "end": 14, "format": fmt(p, "int2_t16"), "inputs": inp}]
    return p


@case("huge-bound", "§2.4", 0, "fp16 keys with amax 60000, q_max 60: m + M about 14000 (the old E_h was near 1e6000; "
      "§2.4's is finite, the first-order branch is not evaluated) (eps implied, claims null, no eps_target): every "
      "obligation holds (found by the fuzzer: exit 4 from fmt_number before the fix)")
def _t14():
    p = planner(uniform="fp16", eps=None)
    p["eps_source"], p["mode"]["kind"], p["eps_target"] = "implied", "uniform", None
    for rule in streams(p):
        for seg in ("sink", "recent", "rest"):
            rule[seg]["inputs"]["amax"] = ["0", "60000"]
    kappa0(p)
    p["layers"][0]["tau"] = "1"
    head(p)["q_max"] = "60"
    return null_claims(p)


@case("exp-beyond-cap", "§2.4", 1, "bf16 keys with amax 1e6 and eps the user's: m + M far above 128, E_h "
      "(its value-error and total-variation terms) > eps, so the attention budget is REFUTED (found by the fuzzer: "
      "exit 2, exp argument refused, before the fix)")
def _t15():
    p = planner(uniform="bf16", eps=None)
    p["eps"], p["eps_source"], p["mode"]["kind"], p["eps_target"] = "50", "user", "uniform", None
    for rule in streams(p):
        for seg in ("sink", "recent", "rest"):
            rule[seg]["inputs"]["amax"] = ["0", "1E+6"]
    kappa0(p)
    return null_claims(p)


@case("exp-beyond-cap-implied", "§2.4", 0, "as exp-beyond-cap, but eps implied, claims null, no eps_target: no "
      "obligation needs E_h, every precision obligation holds")
def _t15b():
    p = _t15()
    p["eps_source"] = "implied"
    return p


@case("exp-beyond-cap-unused", "§2.4", 0, "avg-bits plan (eps implied), claims null, no eps_target; K rest "
      "int2 with amax 32752 and diameters 262016: m + M about 1.3e5, yet no obligation needs E_h and every precision "
      "obligation holds (kappa 0, in the domain); E_h's first-order branch is not evaluated (§2.4)")
def _t15d():
    p = planner(avg_bits=Fraction(6))
    inp = head(p)["K"]["rest"]["inputs"]
    inp["amax"], inp["d_token"], inp["d_channel"] = ["0", "32752"], ["0", "262016"], ["0", "262016"]
    head(p)["K"]["rest"]["format"] = fmt(p, "int2_t16")
    kappa0(p)
    p["eps_target"] = None
    return null_claims(p)


@case("exp-far-beyond-cap", "§2.4", 1, "int8 keys with amax 1e300 (eps the user's): out of the domain, and "
      "E_h (its value-error and total-variation terms) > eps: REFUTED")
def _t15c():
    p = planner()
    rule = head(p)["K"]
    rule["rest"]["inputs"]["amax"] = ["0", "1E+300"]
    kappa0(p)
    return null_claims(p)


@case("r1-recent-error", "§2.4", 1, "R = 1, claims above the bound of the forms a query really reads but below "
      "§2.4's, whose recent segment still counts the recent format's error (every state, reachable or not)")
def _t16():
    p = set_lengths(planner(uniform="int8_t16", eps_target=None), 4, 1)
    res = oracle.decide(p)
    up = lambda r: oracle.canon(oracle.rup(r.hi * (1 + Fraction(1, 10 ** 7)), 40))  # noqa: E731
    p["claims"]["layer_bounds"] = [up(b["sim"]) for b in res.values["b"]]
    p["claims"]["attention_error_max"] = [up(e["sim"]) for e in res.values["E_max"]]
    p["claims"]["end_to_end_bound"] = up(res.values["e_L"]["sim"])
    return p


@case("unreachable-rest-chain", "§2.4", 1, "S = 0, R = 15, T = 16, channel rest: REST is never read (its groups "
      "never complete) yet §2.4 counts the recent-then-rest chain in dK/dV_rest; claims between the two bounds")
def _t17():
    p = set_lengths(planner(uniform="int8_t16,rest=int2_c8", eps_target=None), 0, 15)
    res = oracle.decide(p)
    assert res.values["b"][0]["sim"].hi < res.values["b"][0]["doc"].lo
    up = lambda r: oracle.canon(oracle.rup(r.hi * (1 + Fraction(1, 10 ** 7)), 40))  # noqa: E731
    p["claims"]["layer_bounds"] = [up(b["sim"]) for b in res.values["b"]]
    p["claims"]["attention_error_max"] = [None]
    p["claims"]["end_to_end_bound"] = None
    return p


# ============================================================================ main
def oracle_verdicts(data: bytes) -> tuple:
    """(the document's verdict, the verdict over the states the simulated cache reaches): PROVED,
    REFUTED, UNDECIDABLE or INVALID."""
    try:
        res = oracle.decide(oracle.load(data))
    except oracle.OracleInputError:
        return "INVALID", "INVALID"
    if not res.valid:
        return "INVALID", "INVALID"
    return res.doc, res.sound


def build_all():
    from hnfverify.core.plan import dumps

    items = []
    for name, section, expect, note, differs, fn in CASES:
        p = fn()
        data = p if isinstance(p, bytes) else dumps(p)
        verdict, reach = oracle_verdicts(data)
        assert EXIT_OF[verdict] == expect, (name, verdict, reach, expect)
        entry = {"file": f"{name}.json", "class": name, "section": section, "expect_exit": expect,
                 "oracle": verdict, "note": note}
        if reach != verdict:
            entry["oracle_reachable_only"] = reach
        if differs:
            entry["gate_differs"] = differs
        items.append((entry, data))
    return items


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for f in OUT.glob("*.json"):
        f.unlink()
    manifest = []
    for entry, data in build_all():
        (OUT / entry["file"]).write_bytes(data)
        manifest.append(entry)
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} adversarial plans to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
