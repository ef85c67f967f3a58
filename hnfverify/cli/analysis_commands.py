"""``hnfverify analyze``, ``inspect``, ``fetch-model``, ``splits``."""

from __future__ import annotations

import json
import os
import time
from typing import TextIO

from ..core.vocabulary import Corpus
from ..errors import EXIT_OK, InvalidArgument
from .options import quiet_transformers, set_threads
from .render import print_analysis
from .plan_commands import plan_request, write_plan


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
                              lipschitz_tokens=args.lipschitz_tokens, lipschitz_iters=args.lipschitz_iters,
                              suffix_tokens=args.suffix_tokens, suffix_iters=args.suffix_iters,
                              fisher_tokens=args.fisher_tokens, fisher_labels=args.fisher_labels)
    options.validate()
    if args.plan:
        plan_request(args).validate()
    # cheap checks first: the calibration source must exist before the model is loaded
    if args.calib not in Corpus.values() and not os.path.isfile(args.calib):
        from ..errors import InputError

        raise InputError(f"--calib {args.calib!r}: no such file (built-in corpora: prose, code)")

    set_threads(args.threads)
    quiet_transformers()
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
        from ..planning import plan_from_report
        from ..analysis.report import load

        req = plan_request(args)
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
        report_path = stem + ".report.json"
        save(result, lm.identity(), windows.identity(), report_path)
        summary, arrays = load(report_path)
        if not args.json:
            print_analysis(summary, out, (report_path, str(arrays_path_for(report_path))))
        plan = plan_from_report(summary, arrays, req, os.path.basename(report_path))
        write_plan(plan, args.out, out, args.json)
        return EXIT_OK
    summary = save(result, lm.identity(), windows.identity(), args.out)
    if args.json:
        out.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    else:
        print_analysis(summary, out, (args.out, str(arrays_path_for(args.out))))
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
    quiet_transformers()
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
