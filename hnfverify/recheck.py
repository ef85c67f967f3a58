"""Independent re-checker of hnfverify certificates (docs/design.md §6): standard library only, and
no import of any other hnfverify module, by design — it keeps its own copy of §2-§5 (numbers,
formats, the run-time semantics of a rule plan, the bounds), written from the document.

Given a certificate and the plan it names, it re-validates the plan exactly as `check` does (§3),
re-derives every obligation the plan implies and the whole certificate body, and fails on any
difference: a byte not in canonical form, a hash that does not match, an invalid plan, an
obligation missing, extra, duplicated, unknown or not PROVED, a location, witness, verdict or
SMT-LIB2 text that differs, a summary, assumptions, versions or solver entry that differ or are
malformed. The self-hash is only an integrity check: anyone can recompute it.

    python -m hnfverify.recheck CERT [--plan PLAN]    # exit 0 confirmed, 1 rejected, 2 unusable input
"""

import hashlib
import json
import math
import re
import sys
from fractions import Fraction as F
from pathlib import Path

SEGS = ("sink", "recent", "rest")
MAX_BYTES = 256 * 1024 * 1024          # certificates (and anything recheck reads)
PLAN_MAX_BYTES = 64 * 1024 * 1024      # plans: `check` refuses larger ones
KERNEL = {
    "attention_accumulation": "float32 (the model's own attention kernel; hnfverify does not change it)",
    "dequantization": "float32: x = q * scale + zero (integers), q * scale (fp8), exact cast (fp16/bf16/fp32)",
    "rounding": "round-to-nearest-even for every stored format; scales rounded up and zero-points down in FP16",
    "error_models": "as stated per format in the plan's formats table; lemmas in proofs/",
}
TOOLS = ("cvc5", "hnfverify", "numpy", "python", "z3")
VERSION = (r"[0-9]{1,6}(\.[0-9]{1,6}){1,4}((a|b|rc|\.post|\.dev)[0-9]{1,6}){0,3}"   # PEP 440 release, pre/post/dev,
           r"(\+([a-z0-9]{1,40}(\.[a-z0-9]{1,40}){0,4})?)?")                       # local part


class Reject(Exception):
    pass


def same(a, b):
    """Equal as JSON, types included (0 is not 0.0, True is not 1)."""
    return canonical(a) == canonical(b)


# ---------------------------------------------------------------- exact numbers
NUM = r"-?(0|[1-9][0-9]*)((\.[0-9]+)?([eE][-+]?[0-9]+)?|/[1-9][0-9]*)"


def num(s, where="value"):
    """A plan number (the one grammar, |exponent| <= 400, magnitude 0 or in [1e-300, 1e300])."""
    if not isinstance(s, str) or len(s) > 2000 or not re.fullmatch(NUM, s):
        raise Reject(f"{where}: {str(s)[:40]!r} is not a decimal or p/q number string")
    m = re.search(r"[eE]([-+]?[0-9]+)\Z", s)
    if m and abs(int(m.group(1))) > 400:
        raise Reject(f"{where}: exponent out of range: {s[:40]!r}")
    x = F(s)
    if x != 0 and not F(1, 10 ** 300) <= abs(x) <= F(10) ** 300:
        raise Reject(f"{where}: {s[:40]!r} is out of range (|x| in [1e-300, 1e300] or 0)")
    return x


def fmt(x):
    """Canonical number text: integers plainly (>= 6 trailing zeros: d.ddE+n), finite decimals as
    decimals (>= 6 leading zeros after the point: d.ddE-n), anything else p/q."""
    x = F(x)
    n, d = x.numerator, x.denominator
    sign = "-" if n < 0 else ""

    def sci(sig, exp):
        return f"{sign}{sig[0]}{'.' + sig[1:] if len(sig) > 1 else ''}E{exp}"

    if d == 1:
        digits = str(abs(n))
        if len(digits) - len(digits.rstrip("0")) >= 6:
            return sci(digits.rstrip("0"), f"+{len(digits) - 1}")
        return str(n)
    twos = (d & -d).bit_length() - 1
    rest, fives = d >> twos, 0
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{n}/{d}"
    k = max(twos, fives)
    digits = str(abs(n) * 10 ** k // d).rjust(k + 1, "0")
    whole, frac = digits[:-k], digits[-k:].rstrip("0")
    lead = len(frac) - len(frac.lstrip("0"))
    if whole == "0" and lead >= 6:
        return sci(frac.lstrip("0"), f"-{lead + 1}")
    return f"{sign}{whole}.{frac}"


def bound(x):
    """A bound's text; null above 1e300 (beyond the plan number range a bound is vacuous, and its
    digits may be too many to print)."""
    return None if x > F(10) ** 300 else fmt(x)


def show(x):
    return "more than 1E+300" if x > F(10) ** 300 else f"{float(x):.9g}"


INF = math.inf          # a bound too large to compute exactly (exp of more than 65536): +infinity


def up(x):
    return x if x == INF else round_up(x)


def round_up(x, bits=64):
    """A dyadic rational >= x with at most 64 significant bits."""
    if x == 0:
        return F(0)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    sh = bits - e
    if sh >= 0:
        return F(-((-x.numerator << sh) // x.denominator), 1 << sh)
    return F(-((-x.numerator) // (x.denominator << -sh)) << -sh)


def sqrt_up(x, bits=64):
    if x == 0:
        return F(0)
    sc = 2 * bits + max(0, x.denominator.bit_length() - x.numerator.bit_length())
    r = math.isqrt((x.numerator << (2 * sc)) // x.denominator)
    for c in (F(r, 1 << sc), F(r + 1, 1 << sc)):
        if c * c >= x:
            return c
    return F(r + 2, 1 << sc)


def exp_up(x, bits=64):
    if x > 65536:
        raise Reject("a bound needs exp of more than 65536 (`check` refuses such a plan)")
    s, y = 0, x
    while y > F(1, 2):
        y, s = y / 2, s + 1
    total, term = F(1), F(1)
    for k in range(1, 25):
        term = term * y / k
        total += term
    r = round_up(total + 2 * term * y / 25, bits)
    for _ in range(s):
        r = round_up(r * r, bits)
    return r


# ---------------------------------------------------------------- formats (docs/design.md §2.2, §2.3)
def fmt_def(name):
    """The format a name denotes, or None: unit roundoff u, grid, domain, bits, table entry."""
    floats = {"fp32": (23, -126, (2 - F(1, 2 ** 23)) * F(2) ** 127, 32), "fp16": (10, -14, F(65504), 16),
              "bf16": (7, -126, (2 - F(1, 2 ** 7)) * F(2) ** 127, 16)}
    if not isinstance(name, str):
        return None
    if name in floats:
        mant, emin, mx, bits = floats[name]
        f = {"family": "float", "gran": "none", "group": 0, "bits": bits, "over": 0, "max": mx, "domain": mx}
    elif re.fullmatch(r"fp8_(e4m3|e5m2)_t[1-9][0-9]*", name):
        mant, emin, mx = (3, -6, F(448)) if "e4m3" in name else (2, -14, F(57344))
        f = {"family": "fp8", "gran": "token", "group": int(name.rsplit("_t", 1)[1]), "bits": 8, "over": 16,
             "max": mx, "domain": F(65504)}
    else:
        m = re.fullmatch(r"int(8|4|2)_(t|c)([1-9][0-9]*)", name)
        if not m or not 1 <= int(m.group(3)) <= 4096:
            return None
        b = int(m.group(1))
        return {"name": name, "family": "int", "gran": "token" if m.group(2) == "t" else "channel",
                "group": int(m.group(3)), "bits": b, "over": 32, "u": F(1, 2 * (2 ** b - 1)), "domain": F(65504)}
    f.update(name=name, u=F(1, 2 ** (mant + 1)), sub=F(2) ** (emin - mant - 1))
    return f


def fmt_json(f):
    """The format's entry in a plan's formats table."""
    if f["family"] == "float":
        em = (f"round-to-nearest; |dx| <= u|x| (normal), <= {fmt(f['sub'])} (subnormal); "
              f"overflow above {fmt(f['max'])}")
    elif f["family"] == "fp8":
        em = (f"per-token FP16 scale s >= amax/{fmt(f['max'])}, clamp, round-to-nearest-even; "
              f"|dx| <= (u + 2^-21)|x| + (1 + 2^-21) {fmt(f['sub'])} s")
    else:
        em = ("asymmetric round-to-nearest, FP16 zero-point (rounded down) and scale (rounded up) per group; "
              "|dx| <= u (1 + 2^-9) range + (u 2^-9 + 2^-20) |x|max + 2^-23")
    bpe = F(f["bits"]) + (F(f["over"], f["group"]) if f["over"] else 0)
    return {"family": f["family"], "granularity": f["gran"], "group": f["group"], "value_bits": f["bits"],
            "overhead_bits": f["over"], "bits_per_element": fmt(bpe), "u": fmt(f["u"]), "error_model": em}


def diam(f, st):
    """D of Theorem 5.7: the l2 diameter of the box the format quantizes a vector over."""
    return st["dc"] if f["gran"] == "channel" else st["dt"]


def l2_error(f, st):
    """||x - dequant(quant(x))||_2 for one cached d-vector within the ranges st (the lemmas of §2.3)."""
    sd = sqrt_up(F(st["d"]))
    norm = sd * st["amax"]
    if f["family"] == "float":
        return f["u"] * norm + sd * f["sub"]
    if f["family"] == "fp8":
        scale = max(st["amax"] * (1 + F(1, 2 ** 9)) / f["max"], F(1, 2 ** 14))
        return (f["u"] + F(1, 2 ** 21)) * norm + sd * f["sub"] * (1 + F(1, 2 ** 21)) * scale
    sl = F(1, 2 ** 9)
    return f["u"] * (1 + sl) * diam(f, st) + (f["u"] * sl + F(1, 2 ** 20)) * norm + sd * F(1, 2 ** 23)


def widen(st, e):
    """Ranges of values moved by at most e in l2 (so by at most e per element), §2.3."""
    if e == 0:
        return st
    g = 2 * sqrt_up(F(st["d"])) * e
    return {"d": st["d"], "dt": st["dt"] + g, "dc": st["dc"] + g, "amax": st["amax"] + e}


def chain_stages(chain, st):
    """[(format, its widened ranges, the error so far)]: e_1 = err(f_1), e_k = up(e_(k-1) + err(f_k))."""
    out, e = [], F(0)
    for k, f in enumerate(chain):
        s = widen(st, e)
        step = l2_error(f, s)
        e = step if k == 0 else round_up(e + step)
        out.append((f, s, e))
    return out


# ---------------------------------------------------------------- plan: reading and validity (§3)
def bad(path, msg):
    raise Reject(f"the plan is invalid: {path}: {msg}")


def read_json(data, what, limit):
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity or float literals, integers of at most
    30 digits, no lone surrogates."""
    if len(data) > limit:
        raise Reject(f"{what} is larger than {limit >> 20} MiB")

    def pairs(kv):
        out = {}
        for k, v in kv:
            if k in out:
                raise Reject(f"{what}: duplicate key {k!r}")
            out[k] = v
        return out

    def no(kind):
        def f(s):
            raise Reject(f"{what}: {kind} {s[:20]!r}")
        return f

    def integer(s):
        if len(s.lstrip("-")) > 30:
            raise Reject(f"{what}: an integer literal of more than 30 digits")
        return int(s)

    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=no("non-finite number"),
                         parse_float=no("a float literal (numbers are strings)"), parse_int=integer)
        canonical(obj)                  # a lone surrogate has no UTF-8 encoding
    except (UnicodeError, ValueError) as e:
        raise Reject(f"{what} is not valid JSON: {str(e)[:200]}")
    return obj


FORMAT_NAME = r"fp32|fp16|bf16|fp8_e4m3_t[1-9][0-9]*|fp8_e5m2_t[1-9][0-9]*|int(8|4|2)_(t|c)[1-9][0-9]*"
INPUTS = ("kappa", "d_token", "d_channel", "amax", "alpha", "qnorm", "vo", "mass_alpha", "mass_avo")
NUMERIC_KEYS = {"eps", "eps_target", "c", "tau", "measured", "margin", "value", "o_proj_norm", "q_max",
                "bits_per_element", "u", "avg_bits", "compression_vs_fp16", "cache_bits_at_max_seq_len",
                "end_to_end_bound"}
LENGTH = 10 ** 8


# specs/plan.schema.json as data: ("int", lo, hi) | ("re", pattern or None, max length) | ("null", spec)
# | ("obj", {key: spec}, {optional key: spec}) | ("map", value spec, key pattern, min keys, required keys)
# | ("list", item spec, min items) | ("pair", spec)
def I(lo=0, hi=None):
    return ("int", lo, hi)


def E(*words):
    return ("re", "|".join(words), None)


def O(req, opt=None):
    return ("obj", req, opt or {})


S, NN, SN = ("re", None, None), ("re", NUM[2:], 2000), ("re", NUM, 2000)      # string, number >= 0, number
NAME = ("re", FORMAT_NAME, None)
INPUTS_SPEC = O({k: ("pair", NN) for k in INPUTS})
SEG, LEN = {"format": NAME, "inputs": ("null", INPUTS_SPEC)}, {"length": I(0, LENGTH)}
GAIN = O({"measured": NN, "margin": NN, "value": NN})
RULE = O({"sink": O({**SEG, **LEN}), "recent": O({**SEG, **LEN}), "rest": O(SEG, LEN), "blocks": (
    "list", O({"start": I(0, LENGTH), "end": I(0, LENGTH), "format": NAME, "inputs": INPUTS_SPEC}), 0)})
HEAD = O({"kv_head": I(), "o_proj_norm": NN, "q_max": NN, "K": RULE, "V": RULE})
LAYER = O({"layer": I(), "tau": NN, "lipschitz": GAIN, "mlp_lipschitz": GAIN, "heads": ("list", HEAD, 1)})
FORMAT = O({"family": E("float", "fp8", "int"), "granularity": E("none", "token", "channel"), "group": I(),
            "value_bits": I(1, 64), "overhead_bits": I(), "bits_per_element": NN, "u": NN, "error_model": S})
PLAN = O({
    "schema_version": I(1, 1), "kind": E("hnfverify-plan"), "tool": ("map", S, None, 0, ("name", "version")),
    "model": ("map", S, None, 0, ("name", "config_sha256")), "calibration": ("map", S, None, 0, ("token_ids_sha256",)),
    "analysis": O({"report": S, "arrays_sha256": ("re", "[0-9a-f]{64}", None), "curvature": E("exact", "seed"),
                   "channel_group": I(1)}),
    "shape": O({k: I(1, 100000) for k in ("layers", "kv_heads", "query_heads", "head_dim")}),
    "max_seq_len": I(1, LENGTH), "eps": NN, "eps_source": E("user", "implied"), "eps_target": ("null", NN), "c": NN,
    "mode": O({"kind": E("eps", "avg_bits", "uniform", "assigned"), "value": S, "budget_split": S}),
    "rule": O({"sink": I(0, LENGTH), "recent": I(0, LENGTH)}), "formats": ("map", FORMAT, FORMAT_NAME, 1, ()),
    "layers": ("list", LAYER, 1),
    "assumptions": ("list", O({"name": S, "statement": S, "value": SN, "margin": SN,
                               "provenance": ("map", None, None, 0, ())}), 0),
    "claims": O({"avg_bits": SN, "compression_vs_fp16": SN, "cache_bits_at_max_seq_len": SN,
                 "layer_bounds": ("list", ("null", SN), 0), "attention_error_max": ("list", ("null", SN), 0),
                 "end_to_end_bound": ("null", SN), "theorem_5_7_violations": I()})})


def conform(x, spec, path="$"):
    kind = spec[0]
    if kind == "int":
        if type(x) is not int or x < spec[1] or (spec[2] is not None and x > spec[2]):
            bad(path, f"expected an integer in [{spec[1]}, {spec[2]}], got {str(x)[:40]!r}")
    elif kind == "re":
        if not isinstance(x, str) or (spec[1] and not re.fullmatch(spec[1], x)) or (spec[2] and len(x) > spec[2]):
            bad(path, f"expected a string{' matching ' + spec[1] if spec[1] else ''}, got {str(x)[:40]!r}")
    elif kind == "null":
        if x is not None:
            conform(x, spec[1], path)
    elif kind == "pair":
        if not isinstance(x, list) or len(x) != 2:
            bad(path, "expected [lo, hi]")
        for i, v in enumerate(x):
            conform(v, spec[1], f"{path}[{i}]")
    elif kind == "list":
        if not isinstance(x, list) or len(x) < spec[2]:
            bad(path, f"expected an array of at least {spec[2]} items")
        for i, v in enumerate(x):
            conform(v, spec[1], f"{path}[{i}]")
    else:
        if not isinstance(x, dict):
            bad(path, "expected an object")
        req, opt = (spec[1], spec[2]) if kind == "obj" else (dict.fromkeys(spec[4]), {})
        for k in req:
            if k not in x:
                bad(path, f"missing {k!r}")
        if kind == "map" and len(x) < spec[3]:
            bad(path, f"needs at least {spec[3]} entries")
        for k, v in x.items():
            if kind == "obj" and k not in req and k not in opt:
                bad(path, f"unknown key {k[:40]!r}")
            if kind == "map" and spec[2] and not re.fullmatch(spec[2], k):
                bad(f"{path}.{k[:40]}", "not a format name")
            sub = (req.get(k) or opt.get(k)) if kind == "obj" else spec[1]
            if sub is not None:
                conform(v, sub, f"{path}.{k}")


def numeric_fields(obj, path="$"):
    """(path, text) of every number-valued field that `check` parses (the same walk as its loader)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}"
            if isinstance(v, str) and k in NUMERIC_KEYS and path != "$.mode" and not path.startswith("$.assumptions"):
                yield p, v
            elif isinstance(v, list) and k in ("layer_bounds", "attention_error_max"):
                yield from ((f"{p}[{i}]", x) for i, x in enumerate(v) if x is not None)
            else:
                yield from numeric_fields(v, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numeric_fields(v, f"{path}[{i}]")


def need(ok, path, msg):
    if not ok:
        bad(path, msg)


def validate(p):
    """Reject any plan `check` refuses (docs/design.md §3): the schema, then every semantic rule."""
    conform(p, PLAN)
    for path, s in numeric_fields(p):
        num(s, path)
    fmts, sh, t, d = p["formats"], p["shape"], p["max_seq_len"], p["shape"]["head_dim"]
    for name, spec in fmts.items():
        f = fmt_def(name)
        need(f is not None, f"$.formats.{name}", "unknown format")
        need(same(spec, fmt_json(f)), f"$.formats.{name}", "the table entry differs from the format's definition")
        need(f["gran"] != "token" or f["group"] == d, f"$.formats.{name}", "a per-token group must be head_dim")
        need(f["gran"] != "channel" or f["group"] == p["analysis"]["channel_group"], f"$.formats.{name}",
             "channel group differs from $.analysis.channel_group")
    need(sh["query_heads"] % sh["kv_heads"] == 0, "$.shape", "query_heads must be a multiple of kv_heads")
    need(len(p["layers"]) == sh["layers"], "$.layers", "one entry per layer of shape.layers")
    need(num(p["eps"]) > 0, "$.eps", "must be > 0")
    need(num(p["c"]) > 0, "$.c", "must be > 0")
    need(p["eps_target"] is None or num(p["eps_target"]) > 0, "$.eps_target", "must be > 0 or null")
    need(p["mode"]["kind"] != "eps" or p["eps_source"] == "user", "$.eps_source", "an eps plan's eps is the user's")
    for key in ("layer_bounds", "attention_error_max"):
        need(len(p["claims"][key]) == len(p["layers"]), f"$.claims.{key}", "one entry per layer")
    for li, layer in enumerate(p["layers"]):
        lp = f"$.layers[{li}]"
        need(layer["layer"] == li, f"{lp}.layer", f"must be {li} (layers in order, none missing or repeated)")
        need(len(layer["heads"]) == sh["kv_heads"], f"{lp}.heads", "one entry per KV head of shape.kv_heads")
        need(num(layer["tau"]) > 0, f"{lp}.tau", "must be > 0")
        for gain in ("lipschitz", "mlp_lipschitz"):
            g = {k: num(v) for k, v in layer[gain].items()}
            need(g["margin"] >= 1, f"{lp}.{gain}.margin", "must be >= 1")
            need(g["value"] >= g["measured"] * g["margin"], f"{lp}.{gain}.value", "is below measured x margin")
        for hi, head in enumerate(layer["heads"]):
            hp = f"{lp}.heads[{hi}]"
            need(head["kv_head"] == hi, f"{hp}.kv_head", f"must be {hi} (heads in order, none missing or repeated)")
            need(num(head["o_proj_norm"]) > 0, f"{hp}.o_proj_norm", "must be > 0")
            for kv in "KV":
                rule, rp = head[kv], f"{hp}.{kv}"
                s_len, r_len = rule["sink"]["length"], rule["recent"]["length"]
                lens = {"sink": s_len, "recent": r_len, "rest": t - s_len - r_len}
                need(lens["rest"] >= 0, rp, "sink + recent lengths exceed max_seq_len")
                need((s_len, r_len) == (p["rule"]["sink"], p["rule"]["recent"]), rp, "lengths differ from $.rule")
                need(rule["rest"].get("length", lens["rest"]) == lens["rest"], f"{rp}.rest.length",
                     "must be max_seq_len - sink - recent")
                items = [(f"{rp}.{seg}", seg, rule[seg]) for seg in SEGS]
                items += [(f"{rp}.blocks[{bi}]", "block", b) for bi, b in enumerate(rule["blocks"])]
                prev_end = -1
                for path, seg, item in items:
                    need(item["format"] in fmts, f"{path}.format", "not in $.formats")
                    need(fmt_def(item["format"])["gran"] != "channel" or seg == "rest" or lens.get(seg, 1) == 0,
                         f"{path}.format", "a channel-grouped format only for the rest")
                    inp = item["inputs"]
                    need(inp is not None or lens.get(seg, 1) == 0, f"{path}.inputs", "a non-empty segment needs inputs")
                    for k in INPUTS if inp is not None else ():
                        need(num(inp[k][0], f"{path}.inputs.{k}[0]") <= num(inp[k][1], f"{path}.inputs.{k}[1]"),
                             f"{path}.inputs.{k}", "lower end exceeds upper end")
                    need(inp is None or num(inp["qnorm"][1]) <= num(head["q_max"]), f"{hp}.q_max",
                         f"below {path}.inputs.qnorm's upper end")
                    if seg == "block":
                        need(item["start"] < item["end"] <= t, path, "needs start < end <= max_seq_len")
                        need(item["start"] >= prev_end, path, "overlaps the previous block or blocks are not sorted")
                        prev_end = item["end"]


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
        return {"d": d, "dt": num(inp["d_token"][1]), "dc": num(inp["d_channel"][1]), "amax": num(inp["amax"][1])}

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
            expect(s["amax"] <= f["domain"], f"{oid}: does not hold: {f['name']} out of its domain (amax "
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
    """E_h of §2.4 with the per-segment dK, dV; masses: the larger of the K and the V rule's."""
    dk, dv = seg_errors(k), seg_errors(v)
    m = {s: round_up(tau * q * dk[s]) for s in dk}
    big, total = max(m.values(), default=F(0)), F(0)
    if any(m[s] + big > 65536 for s in dk):        # too large to compute: +infinity (fails every budget)
        return INF, dk, dv
    for s in dk:
        ma = max(num(x[s]["mass_alpha"][1]) for x in (k["inputs"], v["inputs"]) if s in x)
        mv = max(num(x[s]["mass_avo"][1]) for x in (k["inputs"], v["inputs"]) if s in x)
        e = exp_up(m[s] + big)
        total += round_up(e * dv.get(s, F(0)) * ma) + round_up((e - 1) * mv)
    return round_up(total), dk, dv


def derive(plan):
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
    e_l = INF if INF in inj else round_up(sq * sum((round_up(a * b) for a, b in zip(amp, inj)), F(0)))
    if plan["eps_target"] is not None:
        tgt = num(plan["eps_target"])
        expect(e_l <= tgt, f"composition: does not hold: e_L = {show(e_l)} exceeds eps_target = {fmt(tgt)}, "
                           "the plan violates it")
        w = {"eps_target": fmt(tgt), "end_to_end_bound": bound(e_l), "sqrt_T": fmt(sq),
             "layer_bounds": [bound(b) for b in bl], "lipschitz": [fmt(x) for x in lips],
             "mlp_lipschitz": [fmt(x) for x in mlps], "injected": [bound(x) for x in inj],
             "amplification": [bound(x) for x in amp]}
        out.append(ob("composition", "composition-law", {"layers": len(bl)}, w, smt_composition(inj, lips, sq, tgt)))
    cl = plan["claims"]                                                 # §5.5
    claimed = [(f"layer_bounds[{i}]", cl["layer_bounds"][i], b) for i, b in enumerate(bl)]
    claimed += [(f"attention_error_max[{i}]", cl["attention_error_max"][i], a) for i, a in enumerate(att)]
    for path, x, exact in claimed + [("end_to_end_bound", cl["end_to_end_bound"], e_l)]:
        expect(x is None or num(x) >= exact, f"claims: does not hold: $.claims.{path} = {x} is below the "
                                             f"recomputed {show(exact)}, the plan understates it")
    out.append(ob("claims", "claims", {}, {"layer_bounds": [bound(b) for b in bl],
                                          "attention_error_max": [bound(a) for a in att],
                                          "end_to_end_bound": bound(e_l), "understated": []}))
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


# ---------------------------------------------------------------- the certificate (§6)
def canonical(obj):
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode()


def pretty(obj):
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def own_version():
    """The version of the hnfverify this file belongs to (installed metadata, else the source tree)."""
    try:
        from importlib.metadata import version
        return version("hnfverify")
    except Exception:       # not installed (PackageNotFoundError) or no metadata support
        pass
    root = Path(__file__).resolve().parent
    try:
        proj = re.search(r"(?ms)^\[project\]\s*$(.*?)(^\[|\Z)", (root.parent / "pyproject.toml").read_text())
        m = proj and re.search(r'(?m)^version\s*=\s*"([^"]+)"', proj.group(1))
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        m = re.search(r'(?m)^__version__\s*=\s*"([^"]+)"', (root / "__init__.py").read_text())
        return m.group(1) if m else None
    except OSError:
        return None


def expect(ok, msg):
    if not ok:
        raise Reject(msg)


def check_body(cert, plan, obligations, positions, e_l, bl):
    """Everything besides the obligations, re-derived or checked for form (§6)."""
    top = ["assumptions", "certificate_sha256", "created", "kind", "obligations", "plan", "schema_version", "solver",
           "summary", "tool", "verdict"]
    expect(sorted(cert) == top, f"the certificate's fields are {sorted(cert)}, expected {top}")
    expect(cert["verdict"] == "PROVED", f"the certificate's verdict is {str(cert['verdict'])[:20]!r}, not PROVED")
    p = cert["plan"]
    expect(sorted(p) == ["file", "sha256"] and isinstance(p["file"], str) and p["file"] not in (".", "..")
           and re.fullmatch(r"[^/\\\x00-\x1f\x7f]{1,255}", p["file"]), "plan: expected {sha256, file: a file name}")
    tool = cert["tool"]
    expect(isinstance(tool, dict) and sorted(tool) == list(TOOLS), f"tool: expected the versions of {TOOLS}")
    for k in TOOLS:
        expect((tool[k] is None and k in ("z3", "cvc5", "numpy")) or (isinstance(tool[k], str) and re.fullmatch(
            VERSION, tool[k])), f"tool.{k}: {str(tool[k])[:40]!r} is not a well-formed version")
    mine = own_version()
    expect(tool["hnfverify"] == mine, f"tool.hnfverify is {tool['hnfverify']!r}; this recheck is hnfverify {mine!r}")
    s = cert["solver"]
    expect(isinstance(s, dict) and sorted(s) == ["name", "seed", "timeout_ms", "wall_timeout_s"]
           and s["name"] in ("z3", "cvc5") and same(s["seed"], 0) and type(s["timeout_ms"]) is int
           and s["timeout_ms"] > 0 and isinstance(s["wall_timeout_s"], str) and len(s["wall_timeout_s"]) <= 40
           and re.fullmatch(NUM[2:], s["wall_timeout_s"]) and num(s["wall_timeout_s"]) > 0,
           "solver: expected {name: z3|cvc5, seed: 0, timeout_ms > 0, wall_timeout_s > 0}")
    expect(tool[s["name"]] is not None, f"tool.{s['name']}: the solver that answered has no version")
    expect(cert["created"] is None or (isinstance(cert["created"], str) and re.fullmatch(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z", cert["created"])), "created: null or UTC time")
    expect(same(cert["assumptions"], {"measured": plan["assumptions"], "kernel": KERNEL}),
           "assumptions differ from the plan's (verbatim) and the kernel semantics")
    fams = {}
    for o in obligations:
        fams[o["family"]] = fams.get(o["family"], 0) + 1
    summary = {"obligations": len(obligations), "by_family": fams, "positions_checked": positions,
               "exact_fallbacks": fams["precision-lower-bound"] if "precision-lower-bound" in fams else 0,
               "end_to_end_bound": bound(e_l), "layer_bounds": [bound(b) for b in bl]}
    got = cert["summary"] if isinstance(cert["summary"], dict) else {}
    for k in sorted(set(summary) | set(got)):
        expect(k in got and k in summary and same(got[k], summary[k]),
               f"summary.{k} differs from the recomputed {str(summary.get(k))[:80]}")


def recheck(cert_bytes, plan_bytes):
    """Return a list of confirmations; raise Reject on the first problem."""
    cert = read_json(cert_bytes, "certificate", MAX_BYTES)
    if not isinstance(cert, dict) or cert.get("kind") != "hnfverify-certificate" or not same(
            cert.get("schema_version"), 1):
        raise Reject("not an hnfverify certificate of schema_version 1")
    if pretty(cert) != cert_bytes:
        raise Reject("certificate bytes are not in canonical form (edited?)")
    body = {k: v for k, v in cert.items() if k != "certificate_sha256"}
    if hashlib.sha256(canonical(body)).hexdigest() != cert.get("certificate_sha256"):
        raise Reject("certificate_sha256 does not match the certificate's content")
    plan = read_json(plan_bytes, "plan", PLAN_MAX_BYTES)
    validate(plan)
    if not isinstance(cert.get("plan"), dict) or hashlib.sha256(canonical(plan)).hexdigest() != cert["plan"].get(
            "sha256"):
        raise Reject("the plan's sha256 differs from the one the certificate names")
    exp, positions, e_l, bl = derive(plan)
    got = cert.get("obligations")
    if not isinstance(got, list) or not all(isinstance(o, dict) and isinstance(o.get("id"), str) for o in got):
        raise Reject("obligations: expected a list of objects with an id")
    if any(o.get("family") == "precision-lower-bound-position" for o in got):
        exp = exp + audit(exp)
    want = {o["id"]: o for o in exp}
    seen = set()
    for o in got:
        if o["id"] in seen:
            raise Reject(f"obligation {o['id'][:80]} appears twice")
        seen.add(o["id"])
        if o["id"] not in want:
            raise Reject(f"unexpected obligation {o['id'][:80]!r}: the plan implies no such obligation")
        w = want[o["id"]]
        if o.get("verdict") != "PROVED":
            raise Reject(f"{o['id']}: certificate says {str(o.get('verdict'))[:20]}, not PROVED")
        for k in sorted(set(w) | set(o)):
            if k not in o or k not in w or not same(o[k], w[k]):
                what = "SMT-LIB2 text" if k == "smt2" else k
                raise Reject(f"{o['id']}: {what} differs from what the plan implies")
    missing = [oid for oid in want if oid not in seen]
    if missing:
        raise Reject(f"{len(missing)} obligation(s) missing, e.g. {missing[0]}")
    check_body(cert, plan, exp, positions, e_l, bl)
    return [f"{len(exp)} obligations re-derived from the plan and confirmed", f"end-to-end bound {show(e_l)}"]


def decide(cert_bytes, plan_bytes):
    """(exit code, message) for a certificate and plan given as bytes; never raises."""
    try:
        return 0, "CONFIRMED: " + "; ".join(recheck(cert_bytes, plan_bytes))
    except Reject as e:
        return 1, f"REJECTED: {e}"
    except (RecursionError, MemoryError, KeyError, TypeError, AttributeError, ValueError, IndexError,
            ZeroDivisionError, OverflowError) as e:
        return 1, f"REJECTED: malformed certificate or plan ({type(e).__name__})"


def _read(path, what):
    """(bytes, 0), or (None, exit code) after saying why: too large (1) or unreadable (2)."""
    try:
        if path.stat().st_size > MAX_BYTES:
            print(f"recheck: REJECTED {what} {path}: larger than {MAX_BYTES >> 20} MiB")
            return None, 1
        return path.read_bytes(), 0
    except OSError as e:
        print(f"recheck: error: cannot read {what} {str(path)!r}: {e.strerror}", file=sys.stderr)
        return None, 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    cert_path = Path(argv[0])
    plan_path = None
    if "--plan" in argv:
        i = argv.index("--plan")
        if i + 1 >= len(argv):
            print("recheck: error: --plan needs a path", file=sys.stderr)
            return 2
        plan_path = Path(argv[i + 1])
    cert_bytes, code = _read(cert_path, "certificate")
    if cert_bytes is None:
        return code
    if plan_path is None:
        try:
            name = json.loads(cert_bytes)["plan"]["file"]
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ValueError(name)
        except Exception:
            print("recheck: REJECTED: the certificate does not name its plan (and no --plan given)")
            return 1
        cands = [cert_path.parent / name, cert_path.parent.parent / name, Path(name)]
        plan_path = next((p for p in cands if p.is_file()), None)
        if plan_path is None:
            print(f"recheck: error: plan {name!r} not found next to the certificate; pass --plan", file=sys.stderr)
            return 2
    plan_bytes, code = _read(plan_path, "plan")
    if plan_bytes is None:
        return code
    code, msg = decide(cert_bytes, plan_bytes)
    verdict, _, detail = msg.partition(": ")
    print(f"recheck: {verdict} {cert_path}" + (f" against {plan_path}" if code == 0 else "") + f": {detail}")
    return code


if __name__ == "__main__":
    sys.exit(main())
