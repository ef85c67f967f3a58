"""plan.json: canonical serialization, strict loading and validation (no torch, no numpy).

Canonical form: UTF-8 JSON, keys sorted, one-space indentation, no floats (every real number is a
decimal or p/q string), trailing newline. ``dumps(loads(b)) == b`` for every plan this tool wrote;
``plan_sha256`` hashes the compact canonical encoding, so it does not depend on whitespace.

``load_plan`` rejects, each with its JSON path: files over 64 MiB, invalid UTF-8 or JSON,
duplicate keys, NaN/Infinity and float literals, excessive nesting, anything the JSON Schema
(``specs/plan.schema.json``) rejects, and semantic errors the schema cannot express: unknown or
inconsistent formats, layers/heads missing or out of order, lo > hi, overlapping blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from ..errors import InputError, PlanError
from ..io import canonical_json, lone_surrogate_path, parse_json_int, write_bytes_atomic

MAX_BYTES = 64 * 1024 * 1024
SCHEMA_VERSION = 1                     # $.schema_version of the plans this code writes and reads
# shipped as package data (a byte-identical copy of specs/plan.schema.json; a test compares them)
SCHEMA_PATH = Path(__file__).resolve().parent / "plan.schema.json"


def dumps(plan: dict) -> bytes:
    return (json.dumps(plan, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def plan_sha256(plan: dict) -> str:
    return hashlib.sha256(canonical_json(plan)).hexdigest()


def save_plan(plan: dict, path) -> str:
    """Validate, then write atomically in canonical form. Returns the plan's sha256."""
    validate_plan(plan, str(path))
    write_bytes_atomic(path, dumps(plan))
    return plan_sha256(plan)


@lru_cache(maxsize=1)
def _schema() -> dict:
    if SCHEMA_PATH.is_file():
        return json.loads(SCHEMA_PATH.read_text())
    raise InputError(f"JSON Schema not found at {SCHEMA_PATH}")


def _strict_pattern(validator, pattern, instance, schema):
    """JSON Schema ``pattern`` with ECMA-262's ``$`` (the end of the string): Python's ``$`` also
    matches before a final newline, so the schema alone would let "1\n" or "fp16\n" through."""
    import jsonschema

    if not validator.is_type(instance, "string"):
        return
    strict = pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
    if not re.search(strict, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@lru_cache(maxsize=1)
def _validator_class():
    import jsonschema
    from jsonschema import validators

    return validators.extend(jsonschema.Draft202012Validator, {"pattern": _strict_pattern})


def _path(parts) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise InputError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def _reject_constant(name):
    raise InputError(f"{name} is not a valid number in a plan (numbers are decimal strings)")


def loads(data: bytes, source: str = "<plan>") -> dict:
    """Parse and validate plan bytes. Raises PlanError / InputError, never anything else."""
    if len(data) > MAX_BYTES:
        raise InputError(f"plan {source!r} is {len(data) / 2**20:.0f} MiB; plans over {MAX_BYTES // 2**20} MiB "
                         "are refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"plan {source!r} is not UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                         parse_float=Decimal, parse_int=parse_json_int)
    except InputError as e:
        raise InputError(f"plan {source!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"plan {source!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise InputError(f"plan {source!r} is nested too deeply") from None
    except ValueError as e:                     # defensive: any other literal json/int/Decimal refuses
        raise InputError(f"plan {source!r} is not valid JSON: {str(e)[:200]}") from None
    bad = lone_surrogate_path(obj)
    if bad:
        raise InputError(f"plan {source!r}: {bad}: contains a lone surrogate (a \\uD800-\\uDFFF escape without "
                         "its pair), which is not a character; plan strings must be valid Unicode")
    validate_plan(obj, source)
    return obj


def _shown(path: str) -> str:
    """A path for a message: repr (escapes control characters and surrogates), long ones shortened."""
    return repr(path) if len(path) <= 200 else repr(path[:120] + "..." + path[-40:]) + f" ({len(path)} characters)"


def load_plan(path) -> dict:
    if isinstance(path, str) and not path:
        raise InputError("plan path is empty; give a plan file such as plan.json")
    p = Path(path)
    try:
        if not p.exists():
            raise InputError(f"plan {_shown(str(p))}: no such file")
        if not p.is_file():
            raise InputError(f"plan {_shown(str(p))} is not a regular file")
        size = os.path.getsize(p)
        if size > MAX_BYTES:
            raise InputError(f"plan {_shown(str(p))} is {size / 2**20:.0f} MiB; plans over {MAX_BYTES // 2**20} MiB "
                             "are refused")
        with open(p, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except (OSError, ValueError) as e:          # name too long, permission denied, embedded NUL, I/O error
        raise InputError(f"plan {_shown(str(p))}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    return loads(data, str(p))


def _float_literals(obj, path="$"):
    if isinstance(obj, (float, Decimal)):
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_literals(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _float_literals(v, f"{path}[{i}]")


def validate_plan(obj, source: str = "<plan>") -> None:
    try:
        floats = list(_float_literals(obj))
    except RecursionError:
        raise InputError(f"plan {source!r} is nested too deeply") from None
    if floats:
        raise PlanError(source, [(p, "a JSON float literal; plans write every real number as a decimal or p/q "
                                     "string") for p in floats])
    validator = _validator_class()(_schema())
    problems = []
    try:
        errs = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    except RecursionError:
        raise InputError(f"plan {source!r} is nested too deeply") from None
    for e in errs:
        msg = e.message
        if len(msg) > 300:
            msg = msg[:300] + "..."
        problems.append((_path(e.absolute_path), msg))
    if problems:
        raise PlanError(source, problems)
    problems = _semantic_problems(obj)
    if problems:
        raise PlanError(source, problems)


def _semantic_problems(plan: dict) -> list[tuple[str, str]]:
    from .formats import by_name
    from .numbers import parse_number

    probs = []
    for path, value in _numeric_fields(plan):
        try:
            parse_number(value, path)
        except InputError as e:
            probs.append((path, str(e).split(": ", 1)[-1]))
    fmts = plan["formats"]
    for name, spec in fmts.items():
        try:
            ref = by_name(name).to_json()
        except InputError as e:
            probs.append((f"$.formats.{name}", str(e)))
            continue
        if spec != ref:
            bad = sorted(k for k in ref if spec.get(k) != ref[k])
            probs.append((f"$.formats.{name}", f"fields {bad} do not match the format's definition "
                          f"(e.g. {bad[0]} must be {ref[bad[0]]!r})"))
    shape = plan["shape"]
    if shape["query_heads"] % shape["kv_heads"]:
        probs.append(("$.shape", "query_heads must be a multiple of kv_heads"))
    layers = plan["layers"]
    if len(layers) != shape["layers"]:
        probs.append(("$.layers", f"has {len(layers)} entries, shape.layers says {shape['layers']}"))
    t = plan["max_seq_len"]
    for li, layer in enumerate(layers):
        lp = f"$.layers[{li}]"
        if layer["layer"] != li:
            probs.append((f"{lp}.layer", f"must be {li} (layers in order, none missing), got {layer['layer']}"))
        if len(layer["heads"]) != shape["kv_heads"]:
            probs.append((f"{lp}.heads", f"has {len(layer['heads'])} entries, shape.kv_heads says {shape['kv_heads']}"))
        for hi, head in enumerate(layer["heads"]):
            hp = f"{lp}.heads[{hi}]"
            if head["kv_head"] != hi:
                probs.append((f"{hp}.kv_head", f"must be {hi}, got {head['kv_head']}"))
            for kv in ("K", "V"):
                rule = head[kv]
                rp = f"{hp}.{kv}"
                if rule["sink"]["length"] + rule["recent"]["length"] > t:
                    probs.append((rp, f"sink + recent lengths exceed max_seq_len {t}"))
                for seg in ("sink", "recent", "rest"):
                    item = rule[seg]
                    if item["format"] not in fmts:
                        probs.append((f"{rp}.{seg}.format", f"{item['format']!r} is not in $.formats"))
                    length = item.get("length", t - rule["sink"]["length"] - rule["recent"]["length"])
                    if length > 0 and item["inputs"] is None:
                        probs.append((f"{rp}.{seg}.inputs", "a non-empty segment needs its inputs"))
                    if item["inputs"] is not None:
                        probs += _interval_problems(item["inputs"], f"{rp}.{seg}.inputs", parse_number)
                prev_end = -1
                for bi, blk in enumerate(rule["blocks"]):
                    bp = f"{rp}.blocks[{bi}]"
                    if not blk["start"] < blk["end"] <= t:
                        probs.append((bp, f"needs start < end <= max_seq_len ({t}), got [{blk['start']}, {blk['end']})"))
                    if blk["start"] < prev_end:
                        probs.append((bp, f"overlaps the previous block (starts at {blk['start']} < {prev_end}) "
                                          "or blocks are not sorted"))
                    prev_end = max(prev_end, blk["end"])
                    if blk["format"] not in fmts:
                        probs.append((f"{bp}.format", f"{blk['format']!r} is not in $.formats"))
                    probs += _interval_problems(blk["inputs"], f"{bp}.inputs", parse_number)
    if not probs:
        from .validity import consistency_problems

        probs = consistency_problems(plan)
    return probs


_NUMERIC_KEYS = {"eps", "eps_target", "c", "tau", "measured", "margin", "value", "o_proj_norm", "q_max",
                 "bits_per_element", "u", "avg_bits", "compression_vs_fp16", "cache_bits_at_max_seq_len",
                 "end_to_end_bound", "max_kl", "radius", "logit_bound", "kl_bound"}


def _numeric_fields(obj, path="$"):
    """(json path, string) of every number-valued string field of a plan."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}"
            if isinstance(v, str) and k in _NUMERIC_KEYS and path != "$.mode" and not path.startswith("$.assumptions"):
                yield p, v
            elif isinstance(v, list) and k in ("layer_bounds", "attention_error_max"):
                for i, x in enumerate(v):
                    if x is not None:           # null: a bound above the plan number range (1e300)
                        yield f"{p}[{i}]", x
            else:
                yield from _numeric_fields(v, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numeric_fields(v, f"{path}[{i}]")


def _interval_problems(inputs: dict, path: str, parse) -> list:
    out = []
    for k, (lo, hi) in inputs.items():
        try:
            if parse(lo) > parse(hi):
                out.append((f"{path}.{k}", f"lower end {lo} exceeds upper end {hi}"))
        except InputError as e:
            out.append((f"{path}.{k}", str(e)))
    return out


def claim_float(x) -> float:
    """A claims bound as a float; null (a bound above 1e300, the plan number range) is +inf."""
    from .numbers import parse_number

    return float("inf") if x is None else float(parse_number(x))
