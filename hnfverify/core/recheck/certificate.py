"""The certificate: canonical bytes, its body re-derived and compared (docs/design.md §6)."""

import hashlib
import re
from pathlib import Path

from .base import KERNEL, MAX_BYTES, PLAN_MAX_BYTES, Reject, TOOLS, VERSION, canonical, expect, pretty, same
from .numbers import NUM, bound, num, show
from .validate import read_json, validate
from .derive import audit, derive


def installed_versions():
    """{tool: version} of the tools installed here, as ``check`` records them: python always; z3, cvc5 and
    numpy where their distributions are installed (z3's recorded version drops the wheel's fourth part)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for key, dist in (("z3", "z3-solver"), ("cvc5", "cvc5"), ("numpy", "numpy")):
        try:
            v = version(dist)
        except PackageNotFoundError:
            continue
        out[key] = ".".join(v.split(".")[:3]) if key == "z3" else v
    return out


def own_version():
    """The version of the hnfverify this package belongs to (installed metadata, else the source tree)."""
    try:
        from importlib.metadata import version
        return version("hnfverify")
    except Exception:       # not installed (PackageNotFoundError) or no metadata support
        pass
    root = Path(__file__).resolve().parents[2]       # hnfverify/ (this file: hnfverify/core/recheck/)
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


def check_body(cert, plan, obligations, positions, e_l, bl):
    """Everything besides the obligations, re-derived or checked for form (§6)."""
    top = ["assumptions", "certificate_sha256", "created", "gate", "kind", "obligations", "plan", "schema_version",
           "solver", "summary", "tool", "verdict"]
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
    for k, here in installed_versions().items():     # the certificate binds the tools it was made with
        expect(tool[k] == here, f"tool.{k} is {str(tool[k])[:40]!r}, but this environment has {here!r}: re-check "
                                "where the certificate was made (or re-run check here)")
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
    gate = cert.get("gate")
    if not (isinstance(gate, dict) and sorted(gate) == ["max_kl"] and (gate["max_kl"] is None or (
            isinstance(gate["max_kl"], str) and len(gate["max_kl"]) <= 2000 and re.fullmatch(NUM[2:], gate["max_kl"])
            and num(gate["max_kl"]) > 0))):
        raise Reject("gate: expected {max_kl: null or a number > 0}")
    exp, positions, e_l, bl = derive(plan, None if gate["max_kl"] is None else num(gate["max_kl"]))
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
