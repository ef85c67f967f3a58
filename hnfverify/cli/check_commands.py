"""``hnfverify check``, ``recheck``, ``replay``: the gate and its independent checks."""

from __future__ import annotations

import os
from typing import TextIO

from ..errors import EXIT_OK, InvalidArgument
from ..io import shown_path
from .options import check_output_target, check_timeouts, fraction_arg


def cmd_check(args, out: TextIO, err: TextIO) -> int:
    from .. import __version__
    from ..errors import InputError
    from ..io import write_bytes_atomic
    from ..core.plan import load_plan, plan_sha256
    from ..core.verify import PROVED, Verdict
    from ..core.verify import certificate, outputs
    from ..core.verify.obligations import CheckOptions, check_plan

    check_timeouts(args)
    try:
        args.plan.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"plan {shown_path(args.plan)}: the file name is not valid UTF-8; the reports and the "
                         "certificate record it, so rename the file") from None
    # every output path is checked before the verification, which can take minutes
    check_output_target("--cert-dir", args.cert_dir, directory=True, example="a directory for the certificates")
    if args.output is not None:
        check_output_target("--output", args.output, directory=False, example="a file name such as report.sarif")
        try:
            same = os.path.exists(args.output) and os.path.samefile(args.output, args.plan)
        except OSError:
            same = False
        if same:
            raise InvalidArgument(f"--output {shown_path(args.output)} is the plan itself; give another file name")
    plan = load_plan(args.plan)
    sha = plan_sha256(plan)
    cert_file = os.path.join(args.cert_dir, f"{sha[:16]}.cert.json")
    if os.path.lexists(cert_file) and not os.path.isfile(cert_file):
        raise InvalidArgument(f"--cert-dir {shown_path(args.cert_dir)}: {shown_path(cert_file)}, where this plan's "
                              "certificate goes, exists and is not a regular file")
    opts = CheckOptions(solver=args.solver, timeout_ms=args.timeout_ms, wall_timeout_s=args.wall_timeout,
                        smt_per_position=args.smt_per_position, max_kl=fraction_arg("--max-kl", args.max_kl))
    if opts.max_kl is not None and opts.max_kl <= 0:
        raise InvalidArgument(f"--max-kl must be > 0, got {args.max_kl}")
    if args.smt_per_position:
        n = sum(1 for _ in key_positions(plan))
        if n > 20000:
            raise InvalidArgument(f"--smt-per-position is for small plans (<= 20000 key positions); this plan has {n}")
    result = check_plan(plan, opts)
    verdict = result.verdict()
    cert_path = None
    if verdict == PROVED:
        cert = certificate.build(plan, sha, args.plan, result, opts)
        try:
            cert_path = certificate.write(cert, args.cert_dir)
        except OSError as e:
            raise InputError(f"--cert-dir {shown_path(args.cert_dir)}: cannot write the certificate: "
                             f"{e.strerror or e}") from None
    render = {
        "text": lambda: outputs.text(result, args.plan, sha, cert_path),
        "json": lambda: outputs.as_json(result, args.plan, sha, cert_path),
        "sarif": lambda: outputs.sarif(result, args.plan, sha, __version__),
        "junit": lambda: outputs.junit(result, args.plan),
    }[args.format]()
    if args.output is not None:
        try:
            write_bytes_atomic(args.output, render.encode())
        except OSError as e:
            raise InputError(f"--output {shown_path(args.output)}: cannot write the report: {e.strerror or e}") from None
        out.write(outputs.text(result, args.plan, sha, cert_path).splitlines()[-1 if cert_path is None else -2] + "\n")
    else:
        out.write(render)
    return Verdict(verdict).exit_code


def key_positions(plan):
    for layer in plan["layers"]:
        for head in layer["heads"]:
            yield from range(plan["max_seq_len"])


def cmd_recheck(args, out: TextIO, err: TextIO) -> int:
    from ..core import recheck

    argv = [args.certificate] + (["--plan", args.plan] if args.plan else [])
    import contextlib

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        return recheck.main(argv)


def cmd_replay(args, out: TextIO, err: TextIO) -> int:
    from pathlib import Path

    from ..core.verify.replay import replay_certificates
    from ..errors import EXIT_UNDECIDED, EXIT_VIOLATED, InputError

    check_timeouts(args)
    if args.dump is not None:
        check_output_target("--dump", args.dump, directory=True, example="a directory for the .smt2 files")
    src = Path(args.certs)
    try:
        files = sorted(src.glob("*.cert.json")) if src.is_dir() else [src]
        found = bool(files) and all(f.is_file() for f in files)
    except (OSError, ValueError):
        found = False
    if not found:
        raise InputError(f"no certificates found at {shown_path(args.certs)} (give a .cert.json file or a directory "
                         "holding some)")
    total = replay_certificates(files, args.solver, args.timeout_ms, args.wall_timeout, args.dump, out)
    if total["sat"]:
        return EXIT_VIOLATED
    if total["unknown"]:
        return EXIT_UNDECIDED
    return EXIT_OK
