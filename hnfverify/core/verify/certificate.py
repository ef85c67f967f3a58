"""Certificates: canonical, byte-reproducible JSON that a stdlib-only checker can re-decide.

The file is the canonical serialization (sorted keys, one-space indent, trailing newline) of an
object whose ``certificate_sha256`` is the sha256 of the compact canonical encoding of everything
else; so any changed byte either breaks JSON, breaks canonical form, or breaks the hash — and every
obligation is in any case re-derived by ``hnfverify recheck`` from the plan itself.
No timestamps unless SOURCE_DATE_EPOCH is set; no timings; no absolute paths.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from pathlib import Path

from ...io import canonical_json, write_bytes_atomic

SCHEMA_VERSION = 1
KIND = "hnfverify-certificate"

KERNEL_SEMANTICS = {
    "attention_accumulation": "float32 (the model's own attention kernel; hnfverify does not change it)",
    "dequantization": "float32: x = q * scale + zero (integers), q * scale (fp8), exact cast (fp16/bf16/fp32)",
    "rounding": "round-to-nearest-even for every stored format; scales rounded up and zero-points down in FP16",
    "error_models": "as stated per format in the plan's formats table; lemmas in proofs/",
}


def _versions(solver: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from .smt import solver_version

    out = {"python": platform.python_version(), "z3": solver_version("z3"), "cvc5": solver_version("cvc5")}
    for pkg in ("hnfverify", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _created() -> str | None:
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if not sde:
        return None
    try:
        return datetime.datetime.fromtimestamp(int(sde), tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError):
        return None


def serialize(obj: dict) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def build(plan: dict, plan_sha: str, plan_file: str, result, options) -> dict:
    from ..numbers import fmt_bound, fmt_number

    from collections import Counter

    cert = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "plan": {"sha256": plan_sha, "file": Path(plan_file).name},
        "tool": _versions(options.solver),
        "solver": {"name": options.solver, "seed": 0, "timeout_ms": options.timeout_ms,
                   "wall_timeout_s": fmt_number(__import__("fractions").Fraction(str(options.wall_timeout_s)))},
        "created": _created(),
        "gate": {"max_kl": None if options.max_kl is None else fmt_number(options.max_kl)},
        "verdict": result.verdict(),
        "summary": {
            "obligations": len(result.obligations),
            "by_family": dict(sorted(Counter(o.family for o in result.obligations).items())),
            "positions_checked": result.entries,
            "exact_fallbacks": result.entries_exact,
            "end_to_end_bound": fmt_bound(result.end_to_end_bound),
            "layer_bounds": [fmt_bound(b) for b in result.layer_bounds],
        },
        "assumptions": {"measured": plan["assumptions"], "kernel": KERNEL_SEMANTICS},
        "obligations": [o.to_json() for o in result.obligations],
    }
    cert["certificate_sha256"] = hashlib.sha256(canonical_json(cert)).hexdigest()
    return cert


def write(cert: dict, cert_dir) -> Path:
    d = Path(cert_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{cert['plan']['sha256'][:16]}.cert.json"
    write_bytes_atomic(path, serialize(cert))
    return path
