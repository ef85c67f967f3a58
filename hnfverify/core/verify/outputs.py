"""Reports of a check for people and CI: text, JSON, SARIF 2.1.0, JUnit XML."""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from ..numbers import fmt_bound
from . import PROVED, REFUTED, UNKNOWN

RULES = {
    "precision-lower-bound": "Theorem 5.7: eps >= c * kappa * sum u D^2 for every stored form, inside the formats' "
                             "domains (docs/design.md 2.2-2.3)",
    "attention-error-budget": "attention-output error bound of a (layer, KV head) <= eps (docs/design.md 2.4)",
    "composition-law": "end-to-end error through all layers <= eps_target (docs/design.md 2.5)",
    "kl-budget": "the certified KL bound of every token's next-token distribution <= max_kl (docs/design.md 2.6)",
    "claims": "the plan's claimed bounds are upper bounds of the recomputed ones (docs/design.md 5)",
    "lemma": "a lemma the per-group queries rely on",
    "undecided": "an obligation the solver could not decide (unknown, timeout): fails closed",
}


# control characters (C0, DEL, C1, line/paragraph separators) and lone surrogates: shown as \xNN / \uNNNN
# in text, so a plan path cannot move the terminal's cursor or split a report line
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# what XML 1.0 forbids (every C0 control but tab, newline, CR; surrogates; U+FFFE/U+FFFF), plus DEL and C1
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _escape_char(m) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(s) -> str:
    """``s`` with control characters and lone surrogates written as visible escapes (one line)."""
    return _UNPRINTABLE.sub(_escape_char, str(s))


def _xml(s) -> str:
    """Text that XML 1.0 can hold: forbidden characters written as visible escapes."""
    return _NOT_XML.sub(_escape_char, str(s))


def describe(o) -> str:
    loc, w = o.location, o.witness
    if o.family.startswith("precision"):
        pos = ", ".join(f"{s}-{e - 1}" for s, e in loc["positions"])
        head = f"layer {loc['layer']} head {loc['kv_head']} {loc['kv']} {loc['segment']} positions {pos}"
        if o.verdict == REFUTED:
            chain = " then ".join(st["format"] for st in w.get("stages", [])) or w["format"]
            if w.get("domain", "ok") != "ok":
                return f"{head}: values outside the format domain ({w['domain']}), stored as {chain}"
            return (f"{head}: first violation at position {w.get('first_violation_position')}; requires "
                    f"eps >= {_f(w['rhs'])} (c kappa sum u D^2 with {chain}), eps = {w['eps']}; "
                    f"cheapest admissible last format: {w.get('cheapest_admissible') or 'none'}")
        return head
    if o.family == "attention-error-budget":
        return (f"layer {loc['layer']} head {loc['kv_head']}: attention-output error bound "
                f"{_f(w['error_bound'])} vs eps {w['eps']}")
    if o.family == "claims":
        return "understated: " + "; ".join(w.get("understated", [])) if w.get("understated") else "claims hold"
    if o.family == "composition-law":
        return f"end-to-end bound {_f(w['end_to_end_bound'])} vs eps_target {w['eps_target']}"
    if o.family == "kl-budget":
        return (f"certified KL bound {_f(w['kl_bound'])} (logit oscillation {_f(w['logit_bound'])}) vs max_kl "
                f"{w['max_kl']}")
    return o.id


def _f(s) -> str:
    """A witness number for people; null (a bound above 1e300) as "> 1e300"."""
    from fractions import Fraction

    if s is None:
        return "> 1e300"
    try:
        return f"{float(Fraction(s)):.6g}"
    except (ValueError, ZeroDivisionError, OverflowError):
        return s


def text(result, plan_path: str, sha: str, cert_path) -> str:
    lines = []
    for o in result.obligations:
        if o.verdict == REFUTED:
            lines.append(f"VIOLATED  {o.family}: {describe(o)}")
        elif o.verdict == UNKNOWN:
            lines.append(f"UNDECIDED {o.family}: {describe(o)}: {o.reason}")
    v = result.verdict()
    n_ref = sum(o.verdict == REFUTED for o in result.obligations)
    n_unk = sum(o.verdict == UNKNOWN for o in result.obligations)
    lines.append(f"hnfverify check: {v} {plan_path} (sha256 {sha[:16]}): {len(result.obligations)} obligations, "
                 f"{n_ref} violated, {n_unk} undecided; {result.entries} cached positions checked "
                 f"({result.entries_exact} by exact fallback); end-to-end bound {_f(fmt_bound(result.end_to_end_bound))}")
    if cert_path:
        lines.append(f"certificate {cert_path}")
    return "\n".join(printable(line) for line in lines) + "\n"


def as_json(result, plan_path: str, sha: str, cert_path) -> str:
    return json.dumps({"plan": plan_path, "plan_sha256": sha, "verdict": result.verdict(),
                       "certificate": str(cert_path) if cert_path else None, "positions_checked": result.entries,
                       "exact_fallbacks": result.entries_exact,
                       "obligations": [o.to_json() for o in result.obligations if o.family != "precision-lower-bound-position"]},
                      indent=1, sort_keys=True) + "\n"


def sarif(result, plan_path: str, sha: str, version: str) -> str:
    results = []
    for o in result.obligations:
        if o.verdict == PROVED:
            continue
        rule = o.family if o.verdict == REFUTED else "undecided"
        loc = o.location
        logical = o.id.replace("/", ".")
        msg = describe(o) + (f" ({o.reason})" if o.verdict == UNKNOWN and o.reason else "")
        results.append({
            "ruleId": rule,
            "level": "error",
            "message": {"text": msg},
            "locations": [{
                "physicalLocation": {"artifactLocation": {"uri": _uri(plan_path)}, "region": {"startLine": 1}},
                "logicalLocations": [{"fullyQualifiedName": logical, "kind": "member"}],
            }],
            "partialFingerprints": {"hnfverifyObligation/v1": hashlib.sha256(f"{rule}:{o.id}".encode()).hexdigest()},
            "properties": {"verdict": o.verdict, "location": loc},
        })
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "hnfverify", "version": version, "informationUri": "https://hnfverify.invalid",
                                "rules": [{"id": k, "shortDescription": {"text": v}} for k, v in RULES.items()]}},
            "results": results,
            "properties": {"planSha256": sha, "verdict": result.verdict()},
        }],
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def _uri(path: str) -> str:
    """A SARIF artifactLocation.uri (a URI reference): spaces, %, control and non-ASCII characters
    percent-encoded (UTF-8); ordinary relative or absolute paths stay as they are."""
    return quote(path, safe="/:@!$&'()*+,;=~", errors="backslashreplace")


def junit(result, plan_path: str) -> str:
    by_case: dict = {}
    for o in result.obligations:
        if o.family == "precision-lower-bound-position":
            continue
        layer = o.location.get("layer")
        name = f"layer {layer}" if layer is not None else ("composition" if o.family == "composition-law" else "lemmas")
        by_case.setdefault(name, []).append(o)
    cases, fails, errs = [], 0, 0
    for name, obs in by_case.items():
        bad = [o for o in obs if o.verdict == REFUTED]
        unk = [o for o in obs if o.verdict == UNKNOWN]
        body = ""
        if bad:
            fails += 1
            body = f"<failure message={quoteattr(f'{len(bad)} obligation(s) violated')}>" + \
                escape(_xml("\n".join(describe(o) for o in bad))) + "</failure>"
        elif unk:
            errs += 1
            body = f"<error message={quoteattr(f'{len(unk)} obligation(s) undecided')}>" + \
                escape(_xml("\n".join(f"{o.id}: {o.reason}" for o in unk))) + "</error>"
        cases.append(f'  <testcase classname={quoteattr(_xml("hnfverify." + plan_path))} '
                     f'name={quoteattr(_xml(name))} '
                     f'assertions="{len(obs)}">{body}</testcase>')
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<testsuites><testsuite name="hnfverify check" tests="{len(cases)}" failures="{fails}" errors="{errs}">\n'
            + "\n".join(cases) + "\n</testsuite></testsuites>\n")
