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

import json
import sys
from pathlib import Path

from .base import MAX_BYTES
from .certificate import decide


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
