"""Fuzz the gate: `hnfverify check`'s plan loader and decisions, and `hnfverify recheck`.

Deterministic (seeded) structure-aware mutations of a valid plan and of its PROVED certificate:
bit flips, byte insertions/deletions, truncation, number strings replaced by huge, negative,
non-finite or float values, wrong types, removed or duplicated keys, deep nesting, reordered
layers. For every case:
  * no traceback: only the documented errors (exit 2 / InputError) may escape the loader, and the
    CLI (sampled) must exit with 0, 1, 2 or 3, never 4;
  * no false PROVED: whenever the verifier PROVES a mutated plan, the independent stdlib re-checker
    must confirm a certificate for it;
  * a mutated certificate is never confirmed.
Prints the counts and peak memory; exits 1 on any failure (the inputs are saved to --save).

    python tests/fuzz_gate.py --cases 100000          # make fuzz
    python tests/fuzz_gate.py --seconds 120           # the CI slice
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def base_plan() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mp", Path(__file__).resolve().parent / "data" / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from hnfverify.planner import PlanRequest, plan_from_report

    summary, arrays = mod.synthetic_report(3)
    summary["shape"]["positions"] = 64
    plan = plan_from_report(summary, arrays, PlanRequest(eps=Fraction(50), sink=4, recent=8, max_seq_len=24))
    plan["eps_target"] = "1E+12"
    return plan


NUMBER_SUBST = ["1E+99999", "-1", "NaN", "Infinity", "1e400", "0", "0/1", "1/0", "", "1.5.5", "9" * 3000,
                "1E-400", "12345678901234567890/3", "-0", "0.000000000000000000000000000000001"]
VALUE_SUBST = [None, True, 0, -1, 1.5, [], {}, "x", [[[[[[]]]]]], {"a": {"b": {"c": []}}}, 10 ** 30]


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
    import copy

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
                if isinstance(cur, str) and rng.random() < 0.5:
                    # nudge a number by one unit in its last place
                    try:
                        f = Fraction(cur)
                        _set(o, path, str(f + Fraction(rng.choice([-1, 1]), 10 ** 12)))
                    except (ValueError, ZeroDivisionError):
                        pass
                else:
                    _set(o, path, {"nested": [cur]})
        except (KeyError, IndexError, TypeError):
            continue
    text = json.dumps(o, sort_keys=True, indent=1)
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100000)
    ap.add_argument("--seconds", type=float, default=None, help="stop after this much wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cli-every", type=int, default=500, help="also run the CLI (with z3) every N cases")
    ap.add_argument("--save", default="fuzz-failures")
    ap.add_argument("--memory-mib", type=int, default=2048, help="address-space limit: memory stays bounded")
    ap.add_argument("--progress", type=int, default=0, help="print a line every N cases")
    args = ap.parse_args()
    lim = args.memory_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    from hnfverify import recheck
    from hnfverify.cli import run
    from hnfverify.errors import HnfError
    from hnfverify.plan import dumps, loads, plan_sha256
    from hnfverify.verify import PROVED, certificate
    from hnfverify.verify.obligations import CheckOptions, check_plan

    plan = base_plan()
    plan_bytes = dumps(plan)
    opts = CheckOptions(smt=False)
    res = check_plan(plan, opts)
    assert res.verdict() == PROVED, "the base plan must be PROVED"
    cert_bytes = certificate.serialize(certificate.build(plan, plan_sha256(plan), "plan.json", res, opts))
    assert recheck.decide(cert_bytes, plan_bytes)[0] == 0

    rng = random.Random(args.seed)
    t0 = time.time()
    counts = {"cases": 0, "plan_cases": 0, "cert_cases": 0, "cli_cases": 0, "rejected_plans": 0,
              "proved_mutants": 0, "tracebacks": 0, "false_proved": 0, "mutated_certificates_accepted": 0}
    failures = []
    tmp = Path(tempfile.mkdtemp())
    for n in range(args.cases):
        if args.seconds is not None and time.time() - t0 > args.seconds:
            break
        if args.progress and n % args.progress == 0:
            print(f"  ... {n} cases, {len(failures)} failures", flush=True)
        if failures and len(failures) != counts.get("_saved", 0):
            d = Path(args.save)
            d.mkdir(exist_ok=True)
            kind, data, why = failures[-1]
            (d / f"{len(failures) - 1:03d}-{kind}.bin").write_bytes(data)
            (d / f"{len(failures) - 1:03d}-{kind}.txt").write_text(f"case {n - 1}: {why}")
            counts["_saved"] = len(failures)
        counts["cases"] += 1
        if n % 2 == 0:                                       # a mutated plan through the verifier
            counts["plan_cases"] += 1
            data = mutate_json(plan, rng) if rng.random() < 0.7 else mutate_bytes(plan_bytes, rng)
            if args.cli_every and n % args.cli_every == 0:      # the whole CLI path, z3 included
                counts["cli_cases"] += 1
                f = tmp / "p.json"
                f.write_bytes(data)
                out, err = io.StringIO(), io.StringIO()
                code = run(["check", str(f), "--cert-dir", str(tmp / "certs"), "--wall-timeout", "60"], out, err)
                if code not in (0, 1, 2, 3) or "Traceback" in err.getvalue() or "internal error" in err.getvalue():
                    counts["tracebacks"] += 1
                    failures.append(("cli", data, err.getvalue()[-500:]))
            try:
                p = loads(data)
            except HnfError:
                counts["rejected_plans"] += 1
                continue
            except Exception as e:                           # noqa: BLE001 - this is what we hunt
                counts["tracebacks"] += 1
                failures.append(("plan-load", data, repr(e)))
                continue
            try:
                r = check_plan(p, opts)
            except HnfError:
                counts["rejected_plans"] += 1
                continue
            except Exception as e:                           # noqa: BLE001
                counts["tracebacks"] += 1
                failures.append(("plan-check", data, repr(e)))
                continue
            if r.verdict() == PROVED:
                counts["proved_mutants"] += 1
                try:
                    c = certificate.serialize(certificate.build(p, plan_sha256(p), "plan.json", r, opts))
                except Exception as e:                       # noqa: BLE001
                    counts["tracebacks"] += 1
                    failures.append(("certificate", data, repr(e)))
                    continue
                code, msg = recheck.decide(c, dumps(p))
                if code != 0:
                    counts["false_proved"] += 1
                    failures.append(("false-proved", data, msg))
        else:                                                # a mutated certificate through recheck
            counts["cert_cases"] += 1
            data = mutate_bytes(cert_bytes, rng) if rng.random() < 0.6 else mutate_json(json.loads(cert_bytes), rng)
            if data == cert_bytes:
                continue
            code, msg = recheck.decide(data, plan_bytes)
            if code == 0:
                counts["mutated_certificates_accepted"] += 1
                failures.append(("cert-accepted", data, msg))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts.pop("_saved", None)
    counts["seconds"] = round(time.time() - t0, 1)
    counts["peak_rss_mib"] = round(peak, 1)
    print("fuzz: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if failures:
        d = Path(args.save)
        d.mkdir(exist_ok=True)
        for i, (kind, data, why) in enumerate(failures[:50]):
            (d / f"{i:03d}-{kind}.bin").write_bytes(data)
            (d / f"{i:03d}-{kind}.txt").write_text(why)
        print(f"fuzz: {len(failures)} FAILURES (first inputs saved in {d}/)")
        return 1
    print("fuzz: 0 tracebacks, 0 false PROVED, 0 mutated certificates accepted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
