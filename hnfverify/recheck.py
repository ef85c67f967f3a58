"""Independent re-checker of hnfverify certificates: standard library only (fractions, json,
hashlib, math, re), and no import of any other hnfverify module, by design.

Given a certificate and the plan it names, it re-derives every obligation from the plan alone and
fails on any difference: a byte that is not in canonical form, a hash that does not match, an
obligation missing, extra or duplicated, a witness value, verdict or SMT-LIB2 text that differs
from what the plan implies, or an obligation that does not hold.

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


class Reject(Exception):
    pass


# ---------------------------------------------------------------- numbers
def num(s):
    if not isinstance(s, str) or not re.fullmatch(r"-?(0|[1-9][0-9]*)((\.[0-9]+)?([eE][-+]?[0-9]+)?|/[1-9][0-9]*)", s):
        raise Reject(f"not an exact number: {s!r}")
    m = re.search(r"[eE]([-+]?[0-9]+)$", s)
    if m and abs(int(m.group(1))) > 400:
        raise Reject(f"exponent out of range: {s!r}")
    return F(s)


def round_up(x, bits=64):
    if x <= 0:
        return F(math.floor(x * 2 ** bits), 2 ** bits) if x < 0 else F(0)
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
        raise Reject("a bound needs exp of more than 65536")
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


# ---------------------------------------------------------------- formats: u, theorem diameter, l2 error
FLOATS = {"fp32": (23, -126, (2 - F(1, 2 ** 23)) * F(2) ** 127), "fp16": (10, -14, F(65504)),
          "bf16": (7, -126, (2 - F(1, 2 ** 7)) * F(2) ** 127)}


def fmt_info(name):
    if name in FLOATS:
        m, emin, mx = FLOATS[name]
        return {"kind": "float", "u": F(1, 2 ** (m + 1)), "sub": F(2) ** (emin - m - 1), "max": mx, "gran": "none",
                "group": 0, "bits": 32 if name == "fp32" else 16, "over": 0}
    m = re.fullmatch(r"fp8_(e4m3|e5m2)_t([1-9][0-9]*)", name)
    if m:
        mant, emin, mx = (3, -6, F(448)) if m.group(1) == "e4m3" else (2, -14, F(57344))
        return {"kind": "fp8", "u": F(1, 2 ** (mant + 1)), "sub": F(2) ** (emin - mant - 1), "max": mx,
                "gran": "token", "group": int(m.group(2)), "bits": 8, "over": 16}
    m = re.fullmatch(r"int(8|4|2)_(t|c)([1-9][0-9]*)", name)
    if m:
        b = int(m.group(1))
        return {"kind": "int", "u": F(1, 2 * (2 ** b - 1)), "gran": "token" if m.group(2) == "t" else "channel",
                "group": int(m.group(3)), "bits": b, "over": 32}
    raise Reject(f"unknown format {name!r}")


def stats(inputs, d):
    return {"d": d, "dt": num(inputs["d_token"][1]), "dc": num(inputs["d_channel"][1]), "amax": num(inputs["amax"][1])}


def widen(st, delta):
    if delta == 0:
        return st
    g = 2 * sqrt_up(F(st["d"])) * delta
    return {"d": st["d"], "dt": st["dt"] + g, "dc": st["dc"] + g, "amax": st["amax"] + delta}


def diam(fi, st):
    return st["dc"] if fi["gran"] == "channel" else st["dt"]


def l2_error(fi, st):
    sd = sqrt_up(F(st["d"]))
    norm = sd * st["amax"]
    if fi["kind"] == "float":
        return fi["u"] * norm + sd * fi["sub"]
    if fi["kind"] == "fp8":
        scale = max(st["amax"] * (1 + F(1, 2 ** 9)) / fi["max"], F(1, 2 ** 14))
        return (fi["u"] + F(1, 2 ** 21)) * norm + sd * fi["sub"] * (1 + F(1, 2 ** 21)) * scale
    sl = F(1, 2 ** 9)
    return fi["u"] * (1 + sl) * diam(fi, st) + (fi["u"] * sl + F(1, 2 ** 20)) * norm + sd * F(1, 2 ** 23)


# ---------------------------------------------------------------- SMT-LIB2 text (must match byte for byte)
def lit(x):
    x = F(x)
    if x < 0:
        return f"(- {lit(-x)})"
    return f"{x.numerator}.0" if x.denominator == 1 else f"(/ {x.numerator}.0 {x.denominator}.0)"


def header(logic, comment):
    return f"(set-info :status unsat)\n(set-info :source |hnfverify: {comment}|)\n(set-option :random-seed 0)\n" \
           f"(set-logic {logic})\n"


def smt_precision(eps, c, k, dd, u, comment):
    return (header("QF_NRA", comment) + "(declare-const kappa Real)\n(declare-const D Real)\n"
            + f"(assert (and (<= 0.0 kappa) (<= kappa {lit(k)})))\n(assert (and (<= 0.0 D) (<= D {lit(dd)})))\n"
            + f"(assert (> (* {lit(c)} kappa D D {lit(u)}) {lit(eps)}))\n(check-sat)\n")


def smt_monotonicity():
    return (header("NRA", "monotonicity of c kappa D^2 u in kappa and D")
            + "(assert (not (forall ((c Real) (u Real) (k Real) (k2 Real) (D Real) (D2 Real))\n"
            + "  (=> (and (> c 0.0) (> u 0.0) (<= 0.0 k) (<= k k2) (<= 0.0 D) (<= D D2))\n"
            + "      (<= (* c k D D u) (* c k2 D2 D2 u))))))\n(check-sat)\n")


def smt_composition(bs, ls, st, target):
    n = len(bs)
    out = [header("QF_LRA", "composition law across layers (DESIGN 2.3)")]
    out += [f"(declare-const e{i} Real)\n" for i in range(n + 1)]
    out.append("(assert (= e0 0.0))\n")
    for i in range(n):
        out.append(f"(assert (and (<= 0.0 e{i + 1}) (<= e{i + 1} (+ (* {lit(ls[i])} e{i}) (* {lit(st)} {lit(bs[i])})))))\n")
    out.append(f"(assert (> e{n} {lit(target)}))\n(check-sat)\n")
    return "".join(out)


# ---------------------------------------------------------------- re-derivation
def canonical(obj):
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode()


def pretty(obj):
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def expected(plan, with_smt):
    """Every obligation the plan implies: id -> (family, witness numbers, verdict, smt text or None)."""
    eps, c, t, d = num(plan["eps"]), num(plan["c"]), plan["max_seq_len"], plan["shape"]["head_dim"]
    out = {}
    if with_smt:
        out["lemma/monotonicity"] = ("lemma", {}, "PROVED", smt_monotonicity())
    for layer in plan["layers"]:
        for head in layer["heads"]:
            for kv in ("K", "V"):
                r = head[kv]
                lens = {"sink": r["sink"]["length"], "recent": r["recent"]["length"]}
                lens["rest"] = max(0, t - lens["sink"] - lens["recent"])
                s0 = min(lens["sink"], t)
                spans = {"sink": (0, s0), "recent": (s0, t), "rest": (s0, t)}
                blocks = [(b["start"], b["end"]) for b in r["blocks"]]
                items = []
                for seg in SEGS:
                    a, b = spans[seg]
                    left = [x for x in range(a, b) if not any(s <= x < e for s, e in blocks)] if blocks else [a] * (b > a)
                    if lens[seg] and left:
                        items.append((seg, r[seg]["format"], r[seg]["inputs"]))
                items += [(f"block{i}", b["format"], b["inputs"]) for i, b in enumerate(r["blocks"])]
                for seg, fname, inp in items:
                    fi = fmt_info(fname)
                    st = stats(inp, d)
                    k = num(inp["kappa"][1]) if kv == "K" else F(0)
                    dd = diam(fi, st)
                    rhs = c * k * dd * dd * fi["u"]
                    oid = f"precision/L{layer['layer']}/H{head['kv_head']}/{kv}/{seg}"
                    ok = eps >= rhs
                    smt = smt_precision(eps, c, k, dd, fi["u"], oid) if (ok and kv == "K" and with_smt) else None
                    out[oid] = ("precision-lower-bound", {"eps": eps, "c": c, "kappa_hi": k, "D_hi": dd, "u": fi["u"],
                                                          "rhs": rhs}, "PROVED" if ok else "REFUTED", smt)
    g = plan["shape"]["query_heads"] // plan["shape"]["kv_heads"]
    bl, ls = [], []
    for layer in plan["layers"]:
        tau = num(layer["tau"])
        tot = F(0)
        for head in layer["heads"]:
            e = head_error(head, tau, d, t)
            tot += round_up(num(head["o_proj_norm"]) * sqrt_up(F(g)) * e)
            if plan["mode"]["kind"] == "eps":
                out[f"attention/L{layer['layer']}/H{head['kv_head']}"] = (
                    "attention-error-budget", {"eps": eps, "error_bound": e}, "PROVED" if e <= eps else "REFUTED", None)
        bl.append(round_up(tot))
        ls.append(num(layer["lipschitz"]["value"]))
    amp, acc = [F(1)] * len(ls), F(1)
    for i in range(len(ls) - 1, -1, -1):
        amp[i] = acc
        acc = round_up(acc * ls[i])
    st = sqrt_up(F(t))
    e_l = round_up(st * sum((round_up(a * b) for a, b in zip(amp, bl)), F(0)))
    if plan["eps_target"] is not None:
        tgt = num(plan["eps_target"])
        ok = e_l <= tgt
        out["composition"] = ("composition-law", {"eps_target": tgt, "end_to_end_bound": e_l, "sqrt_T": st},
                              "PROVED" if ok else "REFUTED", smt_composition(bl, ls, st, tgt) if ok and with_smt else None)
    return out, e_l, bl


def head_error(head, tau, d, t):
    s_len, r_len = head["K"]["sink"]["length"], head["K"]["recent"]["length"]
    lens = {"sink": s_len, "recent": r_len, "rest": max(0, t - s_len - r_len)}
    segs = [s for s in SEGS if lens[s]]
    q = num(head["q_max"])

    def errs(kv):
        r = head[kv]
        sl = r["sink"]["length"]
        names = {s: [r[s]["format"]] + [b["format"] for b in r["blocks"] if (b["start"] < sl if s == "sink"
                                                                            else b["end"] > sl)] for s in segs}
        st = {s: stats(r[s]["inputs"], d) for s in segs}
        out = {s: max(l2_error(fmt_info(n), st[s]) for n in names[s]) for s in segs if s != "rest"}
        if "rest" in segs:
            prior = out.get("recent", F(0))
            out["rest"] = round_up(max(l2_error(fmt_info(n), widen(st["rest"], prior)) for n in names["rest"]) + prior)
        return out

    dk, dv = errs("K"), errs("V")
    m = {s: round_up(tau * q * dk[s]) for s in segs}
    big = max(m.values()) if m else F(0)
    total = F(0)
    for s in segs:
        e = exp_up(m[s] + big)
        inp = head["K"][s]["inputs"]
        total += round_up(e * dv[s] * num(inp["mass_alpha"][1])) + round_up((e - 1) * num(inp["mass_avo"][1]))
    return round_up(total)


def recheck(cert_bytes, plan_bytes):
    """Return a list of confirmations; raise Reject on the first problem."""
    try:
        cert = json.loads(cert_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Reject(f"certificate is not valid JSON: {e}")
    if not isinstance(cert, dict) or cert.get("kind") != "hnfverify-certificate" or cert.get("schema_version") != 1:
        raise Reject("not an hnfverify certificate of schema_version 1")
    if pretty(cert) != cert_bytes:
        raise Reject("certificate bytes are not in canonical form (edited?)")
    body = {k: v for k, v in cert.items() if k != "certificate_sha256"}
    if hashlib.sha256(canonical(body)).hexdigest() != cert.get("certificate_sha256"):
        raise Reject("certificate_sha256 does not match the certificate's content")
    try:
        plan = json.loads(plan_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Reject(f"plan is not valid JSON: {e}")
    if hashlib.sha256(canonical(plan)).hexdigest() != cert["plan"]["sha256"]:
        raise Reject("the plan's sha256 differs from the one the certificate names")
    if cert["verdict"] != "PROVED":
        raise Reject(f"the certificate's verdict is {cert['verdict']}, not PROVED")
    with_smt = any("smt2" in o for o in cert["obligations"])
    try:
        exp, e_l, bl = expected(plan, with_smt)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise Reject(f"the plan is malformed: {type(e).__name__}: {e}")
    got = {}
    for o in cert["obligations"]:
        if o["family"] == "precision-lower-bound-position":
            continue
        if o["id"] in got:
            raise Reject(f"obligation {o['id']} appears twice")
        got[o["id"]] = o
    missing = sorted(set(exp) - set(got))
    extra = sorted(set(got) - set(exp))
    if missing:
        raise Reject(f"{len(missing)} obligation(s) missing, e.g. {missing[0]}")
    if extra:
        raise Reject(f"{len(extra)} unexpected obligation(s), e.g. {extra[0]}")
    for oid, (family, wit, verdict, smt) in exp.items():
        o = got[oid]
        if o["family"] != family:
            raise Reject(f"{oid}: family {o['family']} != {family}")
        if verdict != "PROVED":
            raise Reject(f"{oid}: does not hold ({family}), the plan violates it")
        if o["verdict"] != "PROVED":
            raise Reject(f"{oid}: certificate says {o['verdict']}")
        for k, v in wit.items():
            if k not in o["witness"] or num(o["witness"][k]) != v:
                raise Reject(f"{oid}: witness {k} is {o['witness'].get(k)!r}, the plan implies {v}")
        if smt is not None and o.get("smt2") != smt:
            raise Reject(f"{oid}: SMT-LIB2 text differs from the query the plan implies")
    if num(cert["summary"]["end_to_end_bound"]) != e_l:
        raise Reject("summary.end_to_end_bound differs from the recomputed bound")
    if [num(x) for x in cert["summary"]["layer_bounds"]] != bl:
        raise Reject("summary.layer_bounds differ from the recomputed bounds")
    return [f"{len(exp)} obligations re-derived from the plan and confirmed", f"end-to-end bound {float(e_l):.6g}"]


MAX_BYTES = 256 * 1024 * 1024


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
