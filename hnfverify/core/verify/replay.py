"""``hnfverify replay``: the SMT-LIB2 queries of certificates, replayed with z3 or cvc5 (docs/design.md §6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from ...errors import InputError
from ...io import lone_surrogate_path, parse_json_int, shown_path
from .outputs import printable
from .smt import run_queries


def replay_certificates(files: list, solver: str, timeout_ms: int, wall_timeout: float, dump: str | None,
                        out: TextIO) -> dict:
    """Replay every query of ``files`` (certificate paths); print one line per certificate and one per
    query not unsat to ``out``; with ``dump``, also write each query there. Returns the total counts."""
    total = {"unsat": 0, "sat": 0, "unknown": 0}
    for f in files:
        queries = certificate_queries(f)
        if dump is not None:
            try:
                d = Path(dump)
                d.mkdir(parents=True, exist_ok=True)
                for i, (oid, q) in enumerate(queries):
                    (d / f"{f.name[:16]}-{i:05d}.smt2").write_text(q, encoding="utf-8")
            except OSError as e:
                raise InputError(f"--dump {shown_path(dump)}: cannot write the queries: {e.strerror or e}") from None
        answers = run_queries([q for _, q in queries], solver, timeout_ms, wall_timeout)
        counts = {"unsat": 0, "sat": 0, "unknown": 0}
        for (oid, _), a in zip(queries, answers):
            counts[a["result"]] += 1
            if a["result"] != "unsat":
                print(printable(f"  {oid}: {a['result']} {a.get('reason', '')}"), file=out)
        for k in total:
            total[k] += counts[k]
        print(printable(f"{f.name}: {len(queries)} queries with {solver}: {counts['unsat']} unsat, "
                        f"{counts['sat']} sat, {counts['unknown']} unknown"), file=out)
    return total


def certificate_queries(f) -> list[tuple[str, str]]:
    """The (obligation id, SMT-LIB2 text) pairs of a certificate file; InputError if it has none or
    is not a certificate (bad UTF-8 or JSON, overlong integers, lone surrogates, wrong types)."""
    def bad(why: str):
        return InputError(f"{shown_path(f)}: not a readable certificate ({why})")

    try:
        cert = json.loads(f.read_text(encoding="utf-8"), parse_int=parse_json_int)
    except InputError as e:
        raise bad(str(e)) from None
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    except (OSError, ValueError) as e:
        raise bad(str(getattr(e, "strerror", None) or e)[:200]) from None
    if not isinstance(cert, dict) or not isinstance(cert.get("obligations"), list):
        raise bad("expected an object with a list of obligations")
    where = lone_surrogate_path(cert)
    if where:
        raise bad(f"{where} holds a lone surrogate, which is not a character")
    queries = []
    for i, o in enumerate(cert["obligations"]):
        if not isinstance(o, dict):
            raise bad(f"obligations[{i}] is not an object")
        if "smt2" in o:
            if not isinstance(o["smt2"], str) or not isinstance(o.get("id"), str):
                raise bad(f"obligations[{i}]: its id and smt2 must be strings")
            queries.append((o["id"], o["smt2"]))
    if not queries:
        raise bad("it holds no SMT-LIB2 queries")
    return queries
