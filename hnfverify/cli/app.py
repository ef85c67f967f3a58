"""Command line: every subcommand is a function ``(args, out, err) -> exit code``; only ``main`` exits.

Exit codes: 0 success, 1 violated (check/eval), 2 usage error or unusable input,
3 undecided (check), 4 internal error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from fractions import Fraction
from typing import TextIO

from ..errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, HnfError, InvalidArgument


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        return v
    return parse


def _set_threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported elsewhere
        pass


# --------------------------------------------------------------------------- analyze
def print_analysis(summary: dict, out: TextIO, paths: tuple[str, str] | None = None) -> None:
    m, c, s = summary["model"], summary["calibration"], summary["shape"]
    a = summary["analysis"]
    print(f"model        {m['name']}: {m['architecture']}, {s['layers']} layers x {s['kv_heads']} KV heads "
          f"({s['query_heads']} query heads), head_dim {s['head_dim']}; config sha256 {m['config_sha256'][:16]}",
          file=out)
    print(f"calibration  {c['source']} [{c['split']} split]: {c['n_windows']} windows x {c['window']} tokens "
          f"= {c['n_tokens']} tokens from {c['n_documents']} documents; token ids sha256 {c['token_ids_sha256'][:16]}",
          file=out)
    print(f"curvature    {a['curvature']} (planning uses kappa_lo/hi); values: curvature 0 (linear in V_t); "
          f"Lipschitz: measured on {a['lipschitz_tokens']} tokens, {a['lipschitz_iters']} power iterations", file=out)
    hdr = (f"{'layer':>5} {'kappa_max':>10} {'(h,t)':>9} {'alpha_max':>9} {'|q|max':>7} "
           f"{'D_K tok':>15} {'D_V tok':>15} {'Lip(meas)':>9} {'|W_o|':>6}")
    print(hdr, file=out)
    for r in summary["layers"]:
        am = r["kappa_argmax"]
        lip = r["lipschitz_measured"]
        print(f"{r['layer']:>5} {r['kappa_max']:>10.3e} {'(%d,%d)' % (am['kv_head'], am['position']):>9} "
              f"{r['alpha_max']:>9.4f} {r['qnorm_max']:>7.2f} "
              f"{r['k_d_token'][0]:>7.2f}-{r['k_d_token'][1]:<7.2f} {r['v_d_token'][0]:>7.2f}-{r['v_d_token'][1]:<7.2f} "
              f"{(lip if lip is not None else float('nan')):>9.3f} {max(r['o_proj_norm_kvhead']):>6.2f}", file=out)
    kmax = max(summary["layers"], key=lambda r: r["kappa_max"])
    print(f"max kappa {kmax['kappa_max']:.4e} at layer {kmax['layer']}, kv head {kmax['kappa_argmax']['kv_head']}, "
          f"position {kmax['kappa_argmax']['position']}", file=out)
    if paths:
        print(f"wrote        {paths[0]} and {paths[1]} (arrays sha256 {summary['arrays']['sha256'][:16]})", file=out)


def cmd_analyze(args, out: TextIO, err: TextIO) -> int:
    from ..analysis.analyzer import AnalysisOptions
    from ..analysis.report import arrays_path_for

    if args.max_tokens <= 0:
        raise InvalidArgument(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    if args.window <= 1:
        raise InvalidArgument(f"--window must be at least 2, got {args.window}")
    if args.out and os.path.isdir(args.out):
        raise InvalidArgument(f"--out {args.out!r} is a directory; give a file name such as report.json")
    options = AnalysisOptions(curvature=args.curvature, channel_group=args.channel_group,
                              lipschitz_tokens=args.lipschitz_tokens, lipschitz_iters=args.lipschitz_iters)
    options.validate()
    if args.plan:
        _plan_request(args).validate()
    # cheap checks first: the calibration source must exist before the model is loaded
    if args.calib not in ("prose", "code") and not os.path.isfile(args.calib):
        from ..errors import InputError

        raise InputError(f"--calib {args.calib!r}: no such file (built-in corpora: prose, code)")

    _set_threads(args.threads)
    _quiet_transformers()
    from ..analysis.analyzer import analyze
    from ..models import load_model
    from ..analysis.report import save
    from ..texts import token_windows

    t0 = time.perf_counter()
    lm = load_model(args.model, verbose=not args.quiet)
    from ..analysis.instrument import attention_modules

    if not attention_modules(lm.model):
        from ..errors import ModelError

        raise ModelError(f"model {args.model!r} ({type(lm.model).__name__}) has no attention layers "
                         "hnfverify can analyze")
    windows = token_windows(lm.tokenizer, args.calib, split="calib", max_tokens=args.max_tokens, window=args.window)
    t_load = time.perf_counter() - t0
    result = analyze(lm, windows, options, progress=not args.quiet and err.isatty())
    result.timings["load_s"] = t_load
    if args.plan:
        from ..planning.planner import plan_from_report
        from ..analysis.report import load

        req = _plan_request(args)
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
        report_path = stem + ".report.json"
        save(result, lm.identity(), windows.identity(), report_path)
        summary, arrays = load(report_path)
        if not args.json:
            print_analysis(summary, out, (report_path, str(arrays_path_for(report_path))))
        plan = plan_from_report(summary, arrays, req, os.path.basename(report_path))
        _write_plan(plan, args.out, out, args.json)
        return EXIT_OK
    summary = save(result, lm.identity(), windows.identity(), args.out)
    if args.json:
        out.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    else:
        print_analysis(summary, out, (args.out, str(arrays_path_for(args.out))))
    return EXIT_OK


# --------------------------------------------------------------------------- plan, show
def _fraction_arg(name: str, value: str | None):
    if value is None:
        return None
    from ..core.numbers import parse_number

    try:
        return parse_number(value.strip(), name)
    except HnfError:
        raise InvalidArgument(f"{name} must be a finite number such as 0.5, 1e3 or 1/30, got {value!r}") from None


def _plan_request(args):
    from fractions import Fraction

    from ..planning.planner import PlanRequest

    return PlanRequest(
        eps=_fraction_arg("--eps", args.eps), eps_target=_fraction_arg("--eps-target", args.eps_target),
        avg_bits=_fraction_arg("--avg-bits", args.avg_bits), uniform=args.uniform,
        c=_fraction_arg("--c", args.c) if args.c is not None else Fraction(4),
        sink=args.sink, recent=args.recent,
        lipschitz_margin=_fraction_arg("--lipschitz-margin", args.lipschitz_margin),
        curvature=args.plan_curvature, max_seq_len=args.max_seq_len, objective=args.objective)


def _write_plan(plan: dict, out_path: str, out: TextIO, as_json: bool, brief: bool = False) -> None:
    from ..core.plan import save_plan

    sha = save_plan(plan, out_path)
    if as_json:
        out.write(json.dumps({"plan": out_path, "sha256": sha, "claims": plan["claims"]}, indent=1, sort_keys=True)
                  + "\n")
    else:
        print_plan(plan, out, sha, brief)
        print(f"wrote        {out_path}", file=out)


def cmd_plan(args, out: TextIO, err: TextIO) -> int:
    from ..planning.planner import plan_from_report
    from ..analysis.report import load

    req = _plan_request(args)
    req.validate()
    if os.path.isdir(args.out):
        raise InvalidArgument(f"--out {args.out!r} is a directory; give a file name such as plan.json")
    summary, arrays = load(args.report)
    plan = plan_from_report(summary, arrays, req, os.path.basename(args.report))
    _write_plan(plan, args.out, out, args.json, args.brief)
    return EXIT_OK


def print_plan(plan: dict, out: TextIO, sha: str, brief: bool = False) -> None:
    mode = plan["mode"]
    print(f"plan         {plan['model']['name']}: {plan['shape']['layers']} layers x {plan['shape']['kv_heads']} KV heads, "
          f"head_dim {plan['shape']['head_dim']}, max_seq_len {plan['max_seq_len']}; sha256 {sha}", file=out)
    tgt = plan["eps_target"] if plan["eps_target"] is not None else "none"
    print(f"request      mode {mode['kind']} {mode['value']}; eps {plan['eps']} ({plan['eps_source']}), "
          f"eps_target {tgt}, c {plan['c']}; sink {plan['rule']['sink']}, recent window {plan['rule']['recent']}; "
          f"curvature {plan['analysis']['curvature']}", file=out)
    segs = ("sink", "recent", "rest")
    if not brief:
        _plan_table(plan, out, segs)
    _plan_footer(plan, out, segs)


def _plan_table(plan: dict, out: TextIO, segs) -> None:
    from fractions import Fraction

    from ..core.numbers import parse_number

    from ..core.formats import by_name
    from ..core.plan import claim_float

    c = plan["claims"]
    print(f"{'layer':>5}  {'K formats (sink / recent / rest), per KV head':<58} {'V formats':<44} "
          f"{'bits':>6} {'E_attn':>9}", file=out)
    d = plan["shape"]["head_dim"]
    t = plan["max_seq_len"]
    fmts = {n: by_name(n) for n in plan["formats"]}

    def short(n):
        return n.replace("fp8_", "").replace("_t" + str(d), "t").replace("_c", "c")

    from ..core.semantics import StreamRule, segment_bits, stored_counts

    for li, layer in enumerate(plan["layers"]):
        kcol, vcol, bits, n = [], [], Fraction(0), 0
        for h in layer["heads"]:
            for kv, col in (("K", kcol), ("V", vcol)):
                r = h[kv]
                col.append("/".join(short(r[s]["format"]) for s in segs))
                rule = StreamRule(r["sink"]["length"], r["recent"]["length"],
                                  {s: fmts[r[s]["format"]] for s in ("sink", "recent", "rest")})
                counts = stored_counts(rule, t)          # the accounting of docs/design.md §4
                bits += sum(segment_bits(rule.formats[s], s, counts, 1) for s in ("sink", "recent", "rest"))
                n += t
        print(f"{li:>5}  {' '.join(kcol):<58} {' '.join(vcol):<44} {float(bits / n):>6.2f} "
              f"{_claim_at(c['attention_error_max'], li):>9}", file=out)


def _claim_at(values, i: int) -> str:
    """One per-layer claim for the table; "n/a" where the plan's claims list has no entry."""
    from ..core.plan import claim_float

    if not isinstance(values, list) or not 0 <= i < len(values):
        return "n/a"
    return f"{claim_float(values[i]):.3g}"


def _plan_footer(plan: dict, out: TextIO, segs) -> None:
    from collections import Counter

    from ..core.numbers import parse_number

    from ..core.plan import claim_float

    c = plan["claims"]
    use = Counter(h[kv][s]["format"] for layer in plan["layers"] for h in layer["heads"] for kv in "KV" for s in segs)
    print("formats used " + ", ".join(f"{k} x{v}" for k, v in sorted(use.items())), file=out)
    amp = parse_number("1")
    for layer in plan["layers"][1:]:
        amp *= parse_number(layer["lipschitz"]["value"])
    print(f"avg bits     {float(parse_number(c['avg_bits'])):.4f} per element (scales and zero-points included); "
          f"compression vs FP16 {float(parse_number(c['compression_vs_fp16'])):.3f}x; cache at max_seq_len "
          f"{float(parse_number(c['cache_bits_at_max_seq_len'])) / 8 / 1024:.1f} KiB", file=out)
    errs = [claim_float(x) for x in c["attention_error_max"]]
    print(f"bounds       max attention-output error {f'{max(errs):.4g}' if errs else 'n/a'}"
          f"; end-to-end {claim_float(c['end_to_end_bound']):.4g} (block Lipschitz product over layers "
          f"1..{len(plan['layers']) - 1}: {float(amp):.3g}); Theorem 5.7 violations: {c['theorem_5_7_violations']}",
          file=out)


def cmd_show(args, out: TextIO, err: TextIO) -> int:
    from ..core.plan import load_plan, plan_sha256

    plan = load_plan(args.plan)
    if args.json:
        out.write(json.dumps({"sha256": plan_sha256(plan), "claims": plan["claims"]}, indent=1, sort_keys=True) + "\n")
    else:
        print_plan(plan, out, plan_sha256(plan), args.brief)
    return EXIT_OK


def cmd_report(args, out: TextIO, err: TextIO) -> int:
    from pathlib import Path

    from .. import plots
    from ..core.plan import load_plan

    plan = load_plan(args.plan)
    if args.eval_windows < 0:
        raise InvalidArgument(f"--eval-windows must be >= 0, got {args.eval_windows}")
    rows = None
    if args.bench:
        try:
            with open(args.bench, encoding="utf-8") as fh:
                rows = json.load(fh)["rows"]
            for r in rows:
                for e in r["eval"].values():
                    float(e["bits_per_element"]), float(e["kld"])
        except OSError as e:
            raise InvalidArgument(f"--bench {args.bench}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidArgument(f"--bench {args.bench}: not a benchmarks/quality.py result ({e!r})") from None
    outdir = Path(args.out)
    written = [plots.heatmap(plan, outdir / "heatmap.png")]
    if args.eval_windows:
        _set_threads(args.threads)
        _quiet_transformers()
        from ..evaluation import evaluate
        from ..models import load_model

        lm = load_model(args.model, verbose=False)
        r = evaluate(lm, plan, args.text, windows=args.eval_windows)
        pts = [(f"{args.text}, {args.eval_windows} window(s)", b, a) for _, _, b, a in r["per_head"]]
        written.append(plots.bound_scatter(pts, outdir / "bound_vs_actual.png",
                                           f"plan {plan['mode']['kind']} {plan['mode']['value']}: certified E_h vs "
                                           f"actual, per (layer, KV head); {r['bound_violations']} violations"))
    if rows:
        for corpus in rows[0]["eval"]:
            written.append(plots.pareto(rows, outdir / f"pareto-{corpus}.png", corpus))
    for w in written:
        print(f"wrote {w}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------------- check, recheck, replay
MAX_WALL_TIMEOUT_S = 86400              # one day
MAX_TIMEOUT_MS = 86_400_000             # one day, per solver query (z3 takes an unsigned 32-bit value)


def _wall_timeout(name: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and 0 < v <= MAX_WALL_TIMEOUT_S):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number of seconds > 0 and <= "
                                             f"{MAX_WALL_TIMEOUT_S}, got {s!r}")
        return v
    return parse


def _timeout_ms(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = 0
        if not 1 <= v <= MAX_TIMEOUT_MS:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number of milliseconds in [1, {MAX_TIMEOUT_MS}] "
                                             f"(at most {MAX_WALL_TIMEOUT_S} s), got {s!r}")
        return v
    return parse


def _check_timeouts(args) -> None:
    """The same ranges for callers that build ``args`` without the parser."""
    w, t = args.wall_timeout, args.timeout_ms
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and 0 < w <= MAX_WALL_TIMEOUT_S):
        raise InvalidArgument(f"--wall-timeout must be a finite number of seconds > 0 and <= {MAX_WALL_TIMEOUT_S}, "
                              f"got {w!r}")
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_TIMEOUT_MS:
        raise InvalidArgument(f"--timeout-ms must be a whole number of milliseconds in [1, {MAX_TIMEOUT_MS}] "
                              f"(at most {MAX_WALL_TIMEOUT_S} s), got {t!r}")


def _shown(path) -> str:
    """A path for a message: repr (control characters and surrogates escaped), long ones shortened."""
    path = str(path)
    return repr(path) if len(path) <= 200 else repr(path[:120] + "..." + path[-40:]) + f" ({len(path)} characters)"


def _name_max(directory: str) -> tuple[int, int]:
    try:
        return os.pathconf(directory, "PC_NAME_MAX"), os.pathconf(directory, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 255, 4096


def _output_target(option: str, path: str, *, directory: bool, example: str) -> None:
    """Refuse, before any (possibly long) work, an output path that cannot be written: a file where a
    directory is needed or the reverse, a FIFO or device (atomic writes rename a file onto the path),
    a parent that is a file or not writable, names longer than the file system takes."""
    if not path:
        raise InvalidArgument(f"{option} must not be empty; give {example}")
    if "\0" in path:
        raise InvalidArgument(f"{option} {_shown(path)}: a path cannot hold a NUL character")
    p = os.path.abspath(path)
    if directory:
        if os.path.lexists(p) and not os.path.isdir(p):
            raise InvalidArgument(f"{option} {_shown(path)} exists and is not a directory; give {example}")
    else:
        if os.path.isdir(p):
            raise InvalidArgument(f"{option} {_shown(path)} is a directory; give {example}")
        if os.path.lexists(p) and not os.path.isfile(p):
            raise InvalidArgument(f"{option} {_shown(path)} is not a regular file (a FIFO, device or socket?); the "
                                  f"report is written atomically by renaming a new file onto it, so give {example} "
                                  "or leave out the option and redirect stdout")
    created = []                            # the names that the write would create
    anc = p if directory else os.path.dirname(p)
    if not directory:
        created.append(f".{os.path.basename(p)}.XXXXXXXX.tmp")      # the temporary file of the atomic write
    while not os.path.lexists(anc):
        created.append(os.path.basename(anc))
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise InvalidArgument(f"{option} {_shown(path)}: {_shown(anc)} is not a directory; give {example}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{option} {_shown(path)}: no permission to write in {_shown(anc)}")
    name_max, path_max = _name_max(anc)
    for name in created:
        n, tmp = len(os.fsencode(name)), name.endswith(".XXXXXXXX.tmp")
        if n > name_max:
            n, limit = (n - 14, name_max - 14) if tmp else (n, name_max)
            raise InvalidArgument(f"{option} {_shown(path)}: a {'file' if tmp else 'directory'} name of {n} bytes is "
                                  f"too long (at most {limit} here)")
    if len(os.fsencode(p)) + 40 > path_max:
        raise InvalidArgument(f"{option} {_shown(path)}: the path is too long (at most about {path_max - 40} bytes)")


def cmd_check(args, out: TextIO, err: TextIO) -> int:
    from .. import __version__
    from ..errors import EXIT_UNDECIDED, EXIT_VIOLATED, InputError
    from ..io import write_bytes_atomic
    from ..core.plan import load_plan, plan_sha256
    from ..core.verify import PROVED, REFUTED
    from ..core.verify import certificate, outputs
    from ..core.verify.obligations import CheckOptions, check_plan

    _check_timeouts(args)
    try:
        args.plan.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"plan {_shown(args.plan)}: the file name is not valid UTF-8; the reports and the "
                         "certificate record it, so rename the file") from None
    # every output path is checked before the verification, which can take minutes
    _output_target("--cert-dir", args.cert_dir, directory=True, example="a directory for the certificates")
    if args.output is not None:
        _output_target("--output", args.output, directory=False, example="a file name such as report.sarif")
        try:
            same = os.path.exists(args.output) and os.path.samefile(args.output, args.plan)
        except OSError:
            same = False
        if same:
            raise InvalidArgument(f"--output {_shown(args.output)} is the plan itself; give another file name")
    plan = load_plan(args.plan)
    sha = plan_sha256(plan)
    cert_file = os.path.join(args.cert_dir, f"{sha[:16]}.cert.json")
    if os.path.lexists(cert_file) and not os.path.isfile(cert_file):
        raise InvalidArgument(f"--cert-dir {_shown(args.cert_dir)}: {_shown(cert_file)}, where this plan's "
                              "certificate goes, exists and is not a regular file")
    opts = CheckOptions(solver=args.solver, timeout_ms=args.timeout_ms, wall_timeout_s=args.wall_timeout,
                        smt_per_position=args.smt_per_position)
    if args.smt_per_position:
        n = sum(1 for _ in _positions(plan))
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
            raise InputError(f"--cert-dir {_shown(args.cert_dir)}: cannot write the certificate: "
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
            raise InputError(f"--output {_shown(args.output)}: cannot write the report: {e.strerror or e}") from None
        out.write(outputs.text(result, args.plan, sha, cert_path).splitlines()[-1 if cert_path is None else -2] + "\n")
    else:
        out.write(render)
    if verdict == PROVED:
        return EXIT_OK
    return EXIT_VIOLATED if verdict == REFUTED else EXIT_UNDECIDED


def _positions(plan):
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

    from ..errors import EXIT_UNDECIDED, EXIT_VIOLATED, InputError
    from ..core.verify.smt import run_queries

    from ..core.verify.outputs import printable

    _check_timeouts(args)
    if args.dump is not None:
        _output_target("--dump", args.dump, directory=True, example="a directory for the .smt2 files")
    src = Path(args.certs)
    try:
        files = sorted(src.glob("*.cert.json")) if src.is_dir() else [src]
        found = bool(files) and all(f.is_file() for f in files)
    except (OSError, ValueError):
        found = False
    if not found:
        raise InputError(f"no certificates found at {_shown(args.certs)} (give a .cert.json file or a directory "
                         "holding some)")
    total = {"unsat": 0, "sat": 0, "unknown": 0}
    for f in files:
        queries = _certificate_queries(f)
        if args.dump is not None:
            try:
                d = Path(args.dump)
                d.mkdir(parents=True, exist_ok=True)
                for i, (oid, q) in enumerate(queries):
                    (d / f"{f.name[:16]}-{i:05d}.smt2").write_text(q, encoding="utf-8")
            except OSError as e:
                raise InputError(f"--dump {_shown(args.dump)}: cannot write the queries: {e.strerror or e}") from None
        answers = run_queries([q for _, q in queries], args.solver, args.timeout_ms, args.wall_timeout)
        counts = {"unsat": 0, "sat": 0, "unknown": 0}
        for (oid, _), a in zip(queries, answers):
            counts[a["result"]] += 1
            if a["result"] != "unsat":
                print(printable(f"  {oid}: {a['result']} {a.get('reason', '')}"), file=out)
        for k in total:
            total[k] += counts[k]
        print(printable(f"{f.name}: {len(queries)} queries with {args.solver}: {counts['unsat']} unsat, "
                        f"{counts['sat']} sat, {counts['unknown']} unknown"), file=out)
    if total["sat"]:
        return EXIT_VIOLATED
    if total["unknown"]:
        return EXIT_UNDECIDED
    return EXIT_OK


def _certificate_queries(f) -> list[tuple[str, str]]:
    """The (obligation id, SMT-LIB2 text) pairs of a certificate file; InputError if it has none or
    is not a certificate (bad UTF-8 or JSON, overlong integers, lone surrogates, wrong types)."""
    from ..errors import InputError
    from ..io import lone_surrogate_path, parse_json_int

    def bad(why: str):
        return InputError(f"{_shown(f)}: not a readable certificate ({why})")

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


# --------------------------------------------------------------------------- eval, generate
def cmd_eval(args, out: TextIO, err: TextIO) -> int:
    from ..errors import EXIT_VIOLATED
    from ..core.plan import load_plan

    if args.windows <= 0 or args.prefix <= 0 or args.scored <= 0:
        raise InvalidArgument("--windows, --prefix and --scored must be positive")
    texts = args.text or ["prose", "code"]
    for t in texts:
        if t not in ("prose", "code"):
            raise InvalidArgument(f"--text must be prose or code (the evaluation splits), got {t!r}")
    plan = load_plan(args.plan)
    _set_threads(args.threads)
    _quiet_transformers()
    from ..evaluation import evaluate
    from ..models import check_plan_matches_model, load_model

    lm = load_model(args.model, verbose=not args.quiet)
    check_plan_matches_model(plan, lm.model)            # before the evaluation's long passes
    rows = [evaluate(lm, plan, t, windows=args.windows, prefix=args.prefix, scored=args.scored,
                     progress=not args.quiet and err.isatty()) for t in texts]
    if args.format == "json":
        for r in rows:
            out.write(json.dumps(r, sort_keys=True) + "\n")
    else:
        print_eval(rows, plan, out)
    bad = sum(r["bound_violations"] + r["end_to_end_violations"] for r in rows)
    if bad:
        print(f"hnfverify eval: {bad} CERTIFIED BOUND(S) EXCEEDED - the plan's claim does not stand", file=err)
        return EXIT_VIOLATED
    return EXIT_OK


def print_eval(rows: list, plan: dict, out: TextIO) -> None:
    print(f"evaluation of {plan['model']['name']} with plan mode {plan['mode']['kind']} {plan['mode']['value']} "
          f"(eval split; reference = the same model's full-precision cache)", file=out)
    print(f"{'text':6} {'windows':>7} {'scored':>6} {'PPL ref':>8} {'PPL plan':>8} {'dPPL %':>7} {'KLD':>8} "
          f"{'top-1':>6} {'bits/el':>7} {'vs FP16':>7} {'cache KiB':>9} {'s/token':>7} {'viol.':>5} "
          f"{'bound/actual med':>16} {'min':>7}", file=out)
    for r in rows:
        d = 100 * (r["ppl"] / r["ppl_ref"] - 1)
        med = r["bound_over_actual_median"]
        mn = r["bound_over_actual_min"]
        print(f"{r['corpus']:6} {r['windows']:>7} {r['tokens_scored']:>6} {r['ppl_ref']:>8.3f} {r['ppl']:>8.3f} "
              f"{d:>+7.2f} {r['kld']:>8.5f} {r['top1']:>6.3f} {r['bits_per_element']:>7.3f} {r['compression']:>6.2f}x "
              f"{r['cache_bytes'] / 1024:>9.1f} {r['seconds_per_scored_token']:>7.4f} "
              f"{r['bound_violations'] + r['end_to_end_violations']:>5} "
              f"{(f'{med:.3g}' if med else '-'):>16} {(f'{mn:.3g}' if mn else '-'):>7}", file=out)
    for r in rows:
        print(f"soundness    {r['corpus']}: {r['attention_outputs_checked']} attention outputs checked against the "
              f"certified per-head bound, {r['bound_violations']} exceeded it; log10(bound/actual) histogram "
              f"{r['bound_over_actual_log10_histogram']}; end-to-end bound {r['end_to_end_bound']:.3g} vs actual: "
              f"median ratio {r['end_to_end_bound_over_actual_median']:.3g}, {r['end_to_end_violations']} exceeded",
              file=out)


def cmd_generate(args, out: TextIO, err: TextIO) -> int:
    from ..core.plan import load_plan

    plan = load_plan(args.plan)
    if args.max_new_tokens <= 0:
        raise InvalidArgument(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    _set_threads(args.threads)
    _quiet_transformers()
    import torch

    from ..kv.cache import MixedPrecisionCache
    from ..models import load_model

    lm = load_model(args.model, verbose=False)
    cache = MixedPrecisionCache.from_plan(plan, lm.model, on_overflow=args.on_overflow)  # weights, config, shape, tau
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None) and not args.raw:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = args.prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        seq = lm.model.generate(**enc, cache=cache, max_new_tokens=args.max_new_tokens,
                                do_sample=args.sample, pad_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = seq[0, enc["input_ids"].shape[1]:]
    out.write(tok.decode(new, skip_special_tokens=True).strip() + "\n")
    n_pos = cache.get_seq_length()
    print(f"[{len(new)} tokens in {dt:.1f} s; cache {cache.nbytes() / 1024:.1f} KiB for {n_pos} positions = "
          f"{cache.nbytes() * 8 / max(1, 2 * plan['shape']['layers'] * plan['shape']['kv_heads'] * n_pos * plan['shape']['head_dim']):.2f} "
          f"bits per element; plan avg {float(Fraction(plan['claims']['avg_bits'])):.2f} at {plan['max_seq_len']}]",
          file=err)
    if not cache.certified:
        print(f"UNCERTIFIED: the sequence grew to {n_pos} positions, past the plan's max_seq_len "
              f"{plan['max_seq_len']}; the plan's bounds do not cover this output", file=err)
    return EXIT_OK


# --------------------------------------------------------------------------- inspect
def cmd_inspect(args, out: TextIO, err: TextIO) -> int:
    from ..analysis.report import load, lookup

    summary, arrays = load(args.report)
    if args.layer is None:
        print_analysis(summary, out)
        return EXIT_OK
    head, position = args.head, args.position
    if args.at_max:
        if not 0 <= args.layer < summary["shape"]["layers"]:
            raise InvalidArgument(f"--layer must be in [0, {summary['shape']['layers'] - 1}], got {args.layer}")
        where = summary["layers"][args.layer]["kappa_argmax"]
        head, position = where["kv_head"], where["position"]
    row = lookup(summary, arrays, args.layer, head, position)
    if args.json:
        out.write(json.dumps(row, indent=1, sort_keys=True) + "\n")
    else:
        for k, v in row.items():
            if isinstance(v, list) and len(v) > 6:
                v = "[" + ", ".join(f"{x:.4g}" for x in v[:6]) + f", ... ({len(v)} values)]"
            print(f"{k:24} {v}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------------- fetch-model, splits
def cmd_fetch_model(args, out: TextIO, err: TextIO) -> int:
    _quiet_transformers()
    from ..models import load_model

    lm = load_model(args.model, verbose=True)
    ident = lm.identity()
    print(f"{args.model}: {ident['source']} ({ident['architecture']}), config sha256 {ident['config_sha256'][:16]}",
          file=out)
    return EXIT_OK


def cmd_splits(args, out: TextIO, err: TextIO) -> int:
    from ..texts import split_table

    print(f"{'corpus':8} {'split':6} {'documents':>9} {'characters':>11}", file=out)
    for corpus, split, n, chars in split_table():
        print(f"{corpus:8} {split:6} {n:>9} {chars:>11}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------------- parser, main
def _plan_options(p) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--eps", help="attention-output error tolerance: Theorem 5.7 and the per-head budget")
    g.add_argument("--eps-target", help="end-to-end hidden-state error budget (composition law)")
    g.add_argument("--avg-bits", help="memory budget: average bits per element, overhead included")
    g.add_argument("--uniform", help="fixed formats (baselines): one format, e.g. int4_t64, or per K/V/segment "
                   "overrides, e.g. fp16,K.rest=int4_c32,V.rest=int4_t64 (KIVI-style with --sink 0 --recent 128)")
    g.add_argument("--objective", choices=("linear", "layers", "end_to_end"), default="linear",
                   help="what --avg-bits' greedy lowers: the first-order terms of the per-layer attention bounds "
                        "(default), the per-layer bounds themselves, or the end-to-end composition bound")
    g.add_argument("--c", help="the constant c of Theorem 5.7 (default 4)")
    g.add_argument("--sink", type=_positive_int("--sink"), default=4, help="attention-sink prefix length")
    g.add_argument("--recent", type=_positive_int("--recent"), default=64, help="recent window length")
    g.add_argument("--lipschitz-margin", default="1.1", help="factor applied to the measured block Lipschitz estimates")
    g.add_argument("--plan-curvature", choices=("exact", "seed"), default=None,
                   help="override the report's curvature for planning (ablation)")
    g.add_argument("--max-seq-len", type=_positive_int("--max-seq-len"), default=None)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as :class:`InvalidArgument` (so ``run`` prints them to its
    own error stream with exit code 2) instead of writing to sys.stderr and exiting."""

    def error(self, message):
        raise InvalidArgument(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hnfverify", description="Certified mixed-precision KV-cache plans.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("analyze", help="per-position key/value sensitivity of a model on calibration text")
    a.add_argument("--model", default="smollm2", help="smollm2 | tiny-llama | tiny-qwen2 | model dir | .gguf file")
    a.add_argument("--calib", default="prose", help="prose | code (built-in, calibration split) | a text file")
    a.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=1024)
    a.add_argument("--window", type=_positive_int("--window"), default=512, help="tokens per calibration window")
    a.add_argument("--out", default="report.json", help="report JSON; arrays go to <stem>.safetensors")
    a.add_argument("--json", action="store_true", help="print the report summary as JSON")
    a.add_argument("--curvature", default="exact", help="exact (default) | seed (heuristic, ablation only)")
    a.add_argument("--channel-group", type=_positive_int("--channel-group"), default=32)
    a.add_argument("--lipschitz-tokens", type=_positive_int("--lipschitz-tokens"), default=32)
    a.add_argument("--lipschitz-iters", type=_positive_int("--lipschitz-iters"), default=6)
    a.add_argument("--threads", type=_positive_int("--threads"), default=None)
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--plan", action="store_true", help="also plan: --out is then the plan; the report goes "
                   "to <stem>.report.json")
    _plan_options(a)
    a.set_defaults(func=cmd_analyze)

    pl = sub.add_parser("plan", help="a mixed-precision plan from an analysis report")
    pl.add_argument("report")
    pl.add_argument("--out", default="plan.json")
    pl.add_argument("--json", action="store_true", help="print the plan's sha256 and claims as JSON")
    pl.add_argument("--brief", action="store_true", help="no per-layer table")
    pl.add_argument("--curvature", dest="plan_curvature", choices=("exact", "seed"),
                    help="same as --plan-curvature: which curvature the planner uses (ablation)")
    _plan_options(pl)
    pl.set_defaults(func=cmd_plan)

    sh = sub.add_parser("show", help="per-layer table of a plan: formats, bits, compression, bounds, sha256")
    sh.add_argument("plan")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--brief", action="store_true", help="no per-layer table")
    sh.set_defaults(func=cmd_show)

    i = sub.add_parser("inspect", help="print a report, or every field at one (layer, head, position)")
    i.add_argument("report")
    i.add_argument("--layer", type=_positive_int("--layer"))
    i.add_argument("--head", type=_positive_int("--head"), default=0)
    i.add_argument("--position", type=_positive_int("--position"), default=0)
    i.add_argument("--at-max", action="store_true", help="the head and position of the layer's largest kappa")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("check", help="verify a plan: exit 0 holds, 1 violated, 2 bad input, 3 undecided, 4 internal")
    c.add_argument("plan")
    c.add_argument("--cert-dir", default="certs", help="where certificates of PROVED plans are written")
    c.add_argument("--format", choices=("text", "json", "sarif", "junit"), default="text")
    c.add_argument("--output", help="write the report here (atomically) instead of stdout")
    c.add_argument("--solver", choices=("z3", "cvc5"), default="z3")
    c.add_argument("--timeout-ms", type=_timeout_ms("--timeout-ms"), default=10000,
                   help=f"per solver query, in [1, {MAX_TIMEOUT_MS}]")
    c.add_argument("--wall-timeout", type=_wall_timeout("--wall-timeout"), default=300.0,
                   help=f"hard limit (s) for all solver queries, in (0, {MAX_WALL_TIMEOUT_S}]")
    c.add_argument("--smt-per-position", action="store_true", help="also one SMT query per key position (audits)")
    c.set_defaults(func=cmd_check)

    rc = sub.add_parser("recheck", help="re-decide a certificate independently (stdlib only)")
    rc.add_argument("certificate")
    rc.add_argument("--plan", help="the plan (default: the file the certificate names, next to it)")
    rc.set_defaults(func=cmd_recheck)

    rp = sub.add_parser("replay", help="replay the SMT-LIB2 queries of certificates with z3 or cvc5")
    rp.add_argument("certs", help="a certificate or a directory of *.cert.json")
    rp.add_argument("--solver", choices=("z3", "cvc5"), default="z3")
    rp.add_argument("--timeout-ms", type=_timeout_ms("--timeout-ms"), default=10000,
                    help=f"per solver query, in [1, {MAX_TIMEOUT_MS}]")
    rp.add_argument("--wall-timeout", type=_wall_timeout("--wall-timeout"), default=300.0,
                    help=f"hard limit (s) for all solver queries of a certificate, in (0, {MAX_WALL_TIMEOUT_S}]")
    rp.add_argument("--dump", help="also write every query as a .smt2 file into this directory")
    rp.set_defaults(func=cmd_replay)

    ev = sub.add_parser("eval", help="quality and soundness of a plan vs the full-precision cache on held-out text")
    ev.add_argument("plan")
    ev.add_argument("--model", default="smollm2")
    ev.add_argument("--text", action="append", help="prose and/or code (repeatable; default both)")
    ev.add_argument("--windows", type=_positive_int("--windows"), default=8)
    ev.add_argument("--prefix", type=_positive_int("--prefix"), default=512)
    ev.add_argument("--scored", type=_positive_int("--scored"), default=512)
    ev.add_argument("--format", choices=("text", "json"), default="text")
    ev.add_argument("--threads", type=_positive_int("--threads"), default=None)
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    rpt = sub.add_parser("report", help="figures of a plan: format heatmap (layers x positions, K and V), "
                         "bound-vs-actual scatter, Pareto plot from a benchmark result")
    rpt.add_argument("plan")
    rpt.add_argument("--out", required=True, help="directory for the PNG files")
    rpt.add_argument("--bench", help="benchmarks/quality.py's quality.json: adds the Pareto plots")
    rpt.add_argument("--eval-windows", type=int, default=1,
                     help="evaluation windows for the bound-vs-actual scatter (0: skip; needs the model)")
    rpt.add_argument("--text", choices=("prose", "code"), default="prose")
    rpt.add_argument("--model", default="smollm2")
    rpt.add_argument("--threads", type=_positive_int("--threads"), default=None)
    rpt.set_defaults(func=cmd_report)

    gen = sub.add_parser("generate", help="generate text with the plan's mixed-precision cache")
    gen.add_argument("plan")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=120)
    gen.add_argument("--on-overflow", choices=("error", "warn"), default="error",
                     help="past the plan's max_seq_len: stop with an error (default) or go on, marked UNCERTIFIED")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=_positive_int("--seed"), default=0)
    gen.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    gen.add_argument("--threads", type=_positive_int("--threads"), default=None)
    gen.set_defaults(func=cmd_generate)

    f = sub.add_parser("fetch-model", help="download and convert a named model into the cache")
    f.add_argument("model", nargs="?", default="smollm2")
    f.set_defaults(func=cmd_fetch_model)

    s = sub.add_parser("splits", help="the built-in corpora's calibration / evaluation splits")
    s.set_defaults(func=cmd_splits)
    return p


def _encodable(msg: str, stream) -> str:
    """``msg`` with what ``stream``'s encoding cannot write (lone surrogates from undecodable file names,
    say) as backslash escapes, so that printing an error cannot itself fail."""
    enc = getattr(stream, "encoding", None) or "utf-8"
    try:
        return msg.encode(enc, "backslashreplace").decode(enc, "replace")
    except LookupError:
        return msg.encode("ascii", "backslashreplace").decode("ascii")


def run(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Parse ``argv`` and run one subcommand in-process. Returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except InvalidArgument as e:
        print(f"hnfverify: error: {_encodable(str(e), err)}", file=err)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if not getattr(args, "command", None):
        parser.print_help(err)
        return EXIT_USAGE
    try:
        code = int(args.func(args, out, err))
        out.flush()
        return code
    except HnfError as e:
        print(f"hnfverify: error: {_encodable(str(e), err)}", file=err)
        return e.exit_code
    except KeyboardInterrupt:
        print("hnfverify: interrupted", file=err)
        return 130
    except MemoryError:
        print("hnfverify: error: out of memory", file=err)
        return EXIT_INTERNAL
    except BrokenPipeError:
        # the reader went away (`hnfverify plan ... | head`): stop quietly, like other Unix tools
        try:
            sys.stdout = open(os.devnull, "w")          # noqa: SIM115 - avoid a second error at exit
        except OSError:
            pass
        return 141
    except Exception as e:  # internal error: one line unless HNFVERIFY_DEBUG is set
        if os.environ.get("HNFVERIFY_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"hnfverify: internal error: {type(e).__name__}: {_encodable(first, err)} "
              f"(set HNFVERIFY_DEBUG=1 for a traceback)", file=err)
        return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
