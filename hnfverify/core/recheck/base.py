"""recheck's constants and its one exception (docs/design.md §6)."""

import json


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


def canonical(obj):
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode()


def pretty(obj):
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def expect(ok, msg):
    if not ok:
        raise Reject(msg)
