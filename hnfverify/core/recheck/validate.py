"""The plan: strict JSON reading and validity, as `check` does (docs/design.md §3)."""

import json
import re

from .base import Reject, SEGS, canonical, same
from .numbers import NUM, num
from .formats import fmt_def, fmt_json


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


FORMAT_NAME = (r"q8_0|q4_0|q5_0|q4_1|q5_1|iq4_nl|fp8_e4m3_s(0|[1-9][0-9]*)(\.[0-9]*[1-9])?|fp32|fp16|bf16|fp8_e4m3_t[1-9][0-9]*|fp8_e5m2_t[1-9][0-9]*|(int(8|4|3|2)|lm(4|3|2))_(t|c)[1-9][0-9]*"
               r"|(int(8|4|3|2)|lm(4|3|2))_t[1-9][0-9]*_h")
INPUTS = ("kappa", "d_token", "d_channel", "amax", "alpha", "qnorm", "vo", "mass_alpha", "mass_avo")
NUMERIC_KEYS = {"eps", "eps_target", "c", "tau", "measured", "margin", "value", "o_proj_norm", "q_max",
                "bits_per_element", "u", "avg_bits", "compression_vs_fp16", "cache_bits_at_max_seq_len",
                "end_to_end_bound", "max_kl", "radius", "logit_bound", "kl_bound"}
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
#: the rotated formats' ranges (optional: without them a rotated format's bound takes what ||x|| implies)
INPUTS_H = ("d_token_h", "amax_h")
INPUTS_SPEC = O({k: ("pair", NN) for k in INPUTS}, {k: ("pair", NN) for k in INPUTS_H})
SEG, LEN = {"format": NAME, "inputs": ("null", INPUTS_SPEC)}, {"length": I(0, LENGTH)}
GAIN = O({"measured": NN, "margin": NN, "value": NN})
RULE = O({"sink": O({**SEG, **LEN}), "recent": O({**SEG, **LEN}), "rest": O(SEG, LEN), "blocks": (
    "list", O({"start": I(0, LENGTH), "end": I(0, LENGTH), "format": NAME, "inputs": INPUTS_SPEC}), 0)})
HEAD = O({"kv_head": I(), "o_proj_norm": NN, "q_max": NN, "K": RULE, "V": RULE})
LAYER = O({"layer": I(), "tau": NN, "lipschitz": GAIN, "mlp_lipschitz": GAIN, "suffix": ("null", GAIN),
           "heads": ("list", HEAD, 1)})
COMPOSITION = O({"form": E("suffix", "product"), "logit_gain": ("null", GAIN),
                 "remainder": ("null", O({"measured": NN, "margin": NN, "value": NN, "radius": NN}))})
FORMAT = O({"family": E("float", "fp8", "int", "codebook", "ggml"), "granularity": E("none", "token", "channel"), "group": I(),
            "value_bits": I(1, 64), "overhead_bits": I(), "bits_per_element": NN, "u": NN, "error_model": S},
           {"scale": NN})
PLAN = O({
    "schema_version": I(1, 1), "kind": E("hnfverify-plan"), "tool": ("map", S, None, 0, ("name", "version")),
    "model": ("map", S, None, 0, ("name", "config_sha256")), "calibration": ("map", S, None, 0, ("token_ids_sha256",)),
    "analysis": O({"report": S, "arrays_sha256": ("re", "[0-9a-f]{64}", None), "curvature": E("exact", "seed"),
                   "channel_group": I(1)}),
    "shape": O({k: I(1, 100000) for k in ("layers", "kv_heads", "query_heads", "head_dim")}),
    "max_seq_len": I(1, LENGTH), "eps": NN, "eps_source": E("user", "implied"), "eps_target": ("null", NN), "c": NN,
    "max_kl": ("null", NN), "composition": COMPOSITION,
    "mode": O({"kind": E("eps", "avg_bits", "uniform", "assigned"), "value": S, "budget_split": S}),
    "rule": O({"sink": I(0, LENGTH), "recent": I(0, LENGTH)}, {"error_norms": E("u8log")}), "formats": ("map", FORMAT, FORMAT_NAME, 1, ()),
    "layers": ("list", LAYER, 1),
    "assumptions": ("list", O({"name": S, "statement": S, "value": SN, "margin": SN,
                               "provenance": ("map", None, None, 0, ())}), 0),
    "claims": O({"avg_bits": SN, "compression_vs_fp16": SN, "cache_bits_at_max_seq_len": SN,
                 "layer_bounds": ("list", ("null", SN), 0), "attention_error_max": ("list", ("null", SN), 0),
                 "end_to_end_bound": ("null", SN), "theorem_5_7_violations": I(), "logit_bound": ("null", SN),
                 "kl_bound": ("null", SN)})})


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
        need(f["gran"] != "token" or f["group"] == d or (f["family"] == "ggml" and d % f["group"] == 0),
             f"$.formats.{name}", "a per-token group must be head_dim (llama.cpp's blocks of 32: divide it)")
        need(not f.get("rot") or d & (d - 1) == 0, f"$.formats.{name}", "a Hadamard rotation needs a power-of-two "
             "head_dim")
        need(f["gran"] != "channel" or p["analysis"]["channel_group"] % f["group"] == 0, f"$.formats.{name}",
             "channel group does not divide $.analysis.channel_group")
    need(sh["query_heads"] % sh["kv_heads"] == 0, "$.shape", "query_heads must be a multiple of kv_heads")
    need(len(p["layers"]) == sh["layers"], "$.layers", "one entry per layer of shape.layers")
    need(num(p["eps"]) > 0, "$.eps", "must be > 0")
    need(num(p["c"]) > 0, "$.c", "must be > 0")
    need(p["eps_target"] is None or num(p["eps_target"]) > 0, "$.eps_target", "must be > 0 or null")
    need(p["max_kl"] is None or num(p["max_kl"]) > 0, "$.max_kl", "must be > 0 or null")
    comp, suffix = p["composition"], p["composition"]["form"] == "suffix"       # §2.5
    for key in ("remainder", "logit_gain"):
        need((comp[key] is not None) == suffix, f"$.composition.{key}",
             "required with the suffix form, null with the product form")
        if comp[key] is not None:
            g = {k: num(v) for k, v in comp[key].items()}
            need(g["margin"] >= 1, f"$.composition.{key}.margin", "must be >= 1")
            need(g["value"] >= g["measured"] * g["margin"], f"$.composition.{key}.value", "is below measured x margin")
    need(p["mode"]["kind"] != "eps" or p["eps_source"] == "user", "$.eps_source", "an eps plan's eps is the user's")
    for key in ("layer_bounds", "attention_error_max"):
        need(len(p["claims"][key]) == len(p["layers"]), f"$.claims.{key}", "one entry per layer")
    for li, layer in enumerate(p["layers"]):
        lp = f"$.layers[{li}]"
        need(layer["layer"] == li, f"{lp}.layer", f"must be {li} (layers in order, none missing or repeated)")
        need(len(layer["heads"]) == sh["kv_heads"], f"{lp}.heads", "one entry per KV head of shape.kv_heads")
        need(num(layer["tau"]) > 0, f"{lp}.tau", "must be > 0")
        need((layer["suffix"] is not None) == suffix, f"{lp}.suffix",
             "required with the suffix form, null with the product form")
        for gain in ("lipschitz", "mlp_lipschitz") + (("suffix",) if layer["suffix"] is not None else ()):
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
                    for k in (INPUTS + tuple(k for k in INPUTS_H if k in inp)) if inp is not None else ():
                        need(num(inp[k][0], f"{path}.inputs.{k}[0]") <= num(inp[k][1], f"{path}.inputs.{k}[1]"),
                             f"{path}.inputs.{k}", "lower end exceeds upper end")
                    need(inp is None or num(inp["qnorm"][1]) <= num(head["q_max"]), f"{hp}.q_max",
                         f"below {path}.inputs.qnorm's upper end")
                    if seg == "block":
                        need(item["start"] < item["end"] <= t, path, "needs start < end <= max_seq_len")
                        need(item["start"] >= prev_end, path, "overlaps the previous block or blocks are not sorted")
                        prev_end = item["end"]
