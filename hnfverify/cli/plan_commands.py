"""``hnfverify plan``, ``show``, ``report``."""

from __future__ import annotations

import json
import os
from typing import TextIO

from ..errors import EXIT_OK, InvalidArgument
from .options import check_text, fraction_arg, quiet_transformers, set_threads
from .render import print_plan


def plan_request(args):
    from fractions import Fraction

    from ..planning import PlanRequest

    return PlanRequest(
        eps=fraction_arg("--eps", args.eps), eps_target=fraction_arg("--eps-target", args.eps_target),
        avg_bits=fraction_arg("--avg-bits", args.avg_bits), uniform=args.uniform,
        c=fraction_arg("--c", args.c) if args.c is not None else Fraction(4),
        sink=args.sink, recent=args.recent,
        lipschitz_margin=fraction_arg("--lipschitz-margin", args.lipschitz_margin),
        curvature=args.plan_curvature, max_seq_len=args.max_seq_len, objective=args.objective,
        error_norms=not args.no_error_norms, composition=args.composition,
        suffix_margin=fraction_arg("--suffix-margin", args.suffix_margin),
        max_kl=fraction_arg("--max-kl", args.max_kl), channel_group=args.plan_channel_group,
        codebooks=not args.no_codebooks, rotation=not args.no_rotation)


def write_plan(plan: dict, out_path: str, out: TextIO, as_json: bool, brief: bool = False) -> None:
    from ..core.plan import save_plan

    sha = save_plan(plan, out_path)
    if as_json:
        out.write(json.dumps({"plan": out_path, "sha256": sha, "claims": plan["claims"]}, indent=1, sort_keys=True)
                  + "\n")
    else:
        print_plan(plan, out, sha, brief)
        print(f"wrote        {out_path}", file=out)


def cmd_plan(args, out: TextIO, err: TextIO) -> int:
    from ..planning.planner import plan_with_estimate
    from ..analysis.report import load

    req = plan_request(args)
    req.validate()
    if os.path.isdir(args.out):
        raise InvalidArgument(f"--out {args.out!r} is a directory; give a file name such as plan.json")
    summary, arrays = load(args.report)
    plan, estimate = plan_with_estimate(summary, arrays, req, os.path.basename(args.report))
    if estimate is not None and not args.json:
        print(f"estimate     KL per token ~ {estimate:.4g} (measured second-order estimate on the calibration "
              f"text, objective fisher; a ranking, not a bound)", file=out)
    write_plan(plan, args.out, out, args.json, args.brief)
    return EXIT_OK


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
    check_text(args.text)
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
        set_threads(args.threads)
        quiet_transformers()
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
