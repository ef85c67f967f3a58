"""Command line: every subcommand is a function ``(args, out, err) -> exit code``; only ``main`` exits.

Exit codes: 0 success, 1 violated (check/eval), 2 usage error or unusable input,
3 undecided (check), 4 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from ..core.vocabulary import Corpus, Curvature, Objective, Solver
from ..errors import EXIT_INTERNAL, EXIT_USAGE, HnfError, InvalidArgument
from .options import MAX_TIMEOUT_MS, MAX_WALL_TIMEOUT_S, milliseconds_arg, positive_int_arg, seconds_arg
from .analysis_commands import cmd_analyze, cmd_fetch_model, cmd_inspect, cmd_splits
from .engine_commands import LLAMA_TYPES, cmd_certify_engine, cmd_export
from .plan_commands import cmd_plan, cmd_report, cmd_show
from .check_commands import cmd_check, cmd_recheck, cmd_replay
from .runtime_commands import cmd_eval, cmd_generate


def channel_group_arg(name: str):
    """--channel-group: an integer, or ``all``."""
    def parse(s: str):
        if s == "all":
            return s
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer or all, got {s!r}") from None
    return parse


def recent_arg(s: str):
    """--recent: an integer, or ``auto`` (None)."""
    if s == "auto":
        return None
    return positive_int_arg("--recent")(s)


def add_plan_options(p) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--eps", help="attention-output error tolerance: Theorem 5.7 and the per-head budget")
    g.add_argument("--eps-target", help="end-to-end hidden-state error budget (composition law)")
    g.add_argument("--avg-bits", help="memory budget: average bits per element, overhead included")
    g.add_argument("--uniform", help="fixed formats (baselines): one format, e.g. int4_t64, or per K/V/segment "
                   "overrides, e.g. fp16,K.rest=int4_c32,V.rest=int4_t64 (KIVI-style with --sink 0 --recent 128)")
    g.add_argument("--objective", choices=Objective.values(), default=None,
                   help="what the greedy lowers: the measured Fisher estimate of the KL (default for --avg-bits "
                        "where the report has it), the first-order terms of the per-layer attention bounds (the "
                        "default otherwise), the per-layer bounds themselves, or the end-to-end composition bound")
    g.add_argument("--plan-channel-group", dest="plan_channel_group", type=channel_group_arg("--plan-channel-group"),
                   default="all",
                   help="tokens per channel group of the searched plan's channel-grouped formats: the analysis' "
                        "group or a divisor of it that is a multiple of 8; all (default): each unit picks among "
                        "them (bounds from the analysis' group's diameters)")
    g.add_argument("--no-codebooks", dest="no_codebooks", action="store_true",
                   help="searched plans choose from the uniform grids only, not the Lloyd-Max codebooks lmB_* "
                        "(ablation)")
    g.add_argument("--no-rotation", dest="no_rotation", action="store_true",
                   help="searched plans do not choose the Hadamard-rotated per-token formats *_h (ablation)")
    g.add_argument("--c", help="the constant c of Theorem 5.7 (default 4)")
    g.add_argument("--sink", type=positive_int_arg("--sink"), default=4, help="attention-sink prefix length")
    g.add_argument("--recent", type=recent_arg, default=64,
                   help="recent window length, or auto: the window of the analysis' rule grid whose plan has the lowest "
                        "measured KL estimate at the --avg-bits budget (objective fisher)")
    g.add_argument("--lipschitz-margin", default="1.1", help="factor applied to the measured block Lipschitz estimates")
    g.add_argument("--composition", choices=("suffix", "product"), default=None,
                   help="how layer errors compose to the output (docs/design.md 2.5): measured suffix sensitivities "
                        "(default where the report has them) or the product of block gains")
    g.add_argument("--suffix-margin", default="2", help="factor applied to the measured suffix sensitivities and "
                   "the remainder constant")
    g.add_argument("--max-kl", help="budget for the certified KL bound of every token (docs/design.md 2.6)")
    g.add_argument("--plan-curvature", choices=Curvature.values(), default=None,
                   help="override the report's curvature for planning (ablation)")
    g.add_argument("--max-seq-len", type=positive_int_arg("--max-seq-len"), default=None)
    g.add_argument("--no-error-norms", action="store_true",
                   help="do not record each stored vector's error norm (1 byte per position and K|V stream, counted "
                        "in --avg-bits); without them the cache cannot certify its attention at run time")


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as :class:`InvalidArgument` (so ``run`` prints them to its
    own error stream with exit code 2) instead of writing to sys.stderr and exiting."""

    def error(self, message):
        raise InvalidArgument(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="hnfverify", description="Certified mixed-precision KV-cache plans.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("analyze", help="per-position key/value sensitivity of a model on calibration text")
    a.add_argument("--model", default="smollm2", help="smollm2 | tiny-llama | tiny-qwen2 | model dir | .gguf file")
    a.add_argument("--calib", default="prose", help="prose | code (built-in, calibration split) | a text file")
    a.add_argument("--max-tokens", type=positive_int_arg("--max-tokens"), default=1024)
    a.add_argument("--window", type=positive_int_arg("--window"), default=512, help="tokens per calibration window")
    a.add_argument("--out", default="report.json", help="report JSON; arrays go to <stem>.safetensors")
    a.add_argument("--json", action="store_true", help="print the report summary as JSON")
    a.add_argument("--curvature", default="exact", help="exact (default) | seed (heuristic, ablation only)")
    a.add_argument("--channel-group", type=positive_int_arg("--channel-group"), default=128,
                   help="tokens per channel group the diameters are measured over (also every divisor that is a "
                        "multiple of 8: the groups plans may use)")
    a.add_argument("--lipschitz-tokens", type=positive_int_arg("--lipschitz-tokens"), default=32)
    a.add_argument("--lipschitz-iters", type=positive_int_arg("--lipschitz-iters"), default=5,
                   help="Lanczos steps per block Lipschitz estimate (products J v; docs/design.md §2.5a)")
    a.add_argument("--suffix-tokens", type=positive_int_arg("--suffix-tokens"), default=128,
                   help="tokens of the first window the suffix sensitivities are measured on")
    a.add_argument("--suffix-iters", type=positive_int_arg("--suffix-iters"), default=6,
                   help="Lanczos steps per suffix sensitivity; 0: none (plans then compose by products)")
    a.add_argument("--fisher-tokens", type=positive_int_arg("--fisher-tokens"), default=1024,
                   help="tokens of every calibration window the measured sensitivities (the diagonal-Fisher KL "
                        "estimate --objective fisher plans with) take a forward and backward pass over; 0: none")
    a.add_argument("--fisher-labels", choices=("sampled", "text"), default="sampled",
                   help="labels of that pass: drawn from the model's own distribution (default: the Fisher of the "
                        "KL) or the text's next tokens (the empirical Fisher)")
    a.add_argument("--threads", type=positive_int_arg("--threads"), default=None)
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--plan", action="store_true", help="also plan: --out is then the plan; the report goes "
                   "to <stem>.report.json")
    add_plan_options(a)
    a.set_defaults(func=cmd_analyze)

    pl = sub.add_parser("plan", help="a mixed-precision plan from an analysis report")
    pl.add_argument("report")
    pl.add_argument("--out", default="plan.json")
    pl.add_argument("--json", action="store_true", help="print the plan's sha256 and claims as JSON")
    pl.add_argument("--brief", action="store_true", help="no per-layer table")
    pl.add_argument("--curvature", dest="plan_curvature", choices=Curvature.values(),
                    help="same as --plan-curvature: which curvature the planner uses (ablation)")
    pl.add_argument("--channel-group", dest="plan_channel_group", type=channel_group_arg("--channel-group"),
                    help="same as --plan-channel-group")
    add_plan_options(pl)
    pl.set_defaults(func=cmd_plan)

    sh = sub.add_parser("show", help="per-layer table of a plan: formats, bits, compression, bounds, sha256")
    sh.add_argument("plan")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--brief", action="store_true", help="no per-layer table")
    sh.set_defaults(func=cmd_show)

    i = sub.add_parser("inspect", help="print a report, or every field at one (layer, head, position)")
    i.add_argument("report")
    i.add_argument("--layer", type=positive_int_arg("--layer"))
    i.add_argument("--head", type=positive_int_arg("--head"), default=0)
    i.add_argument("--position", type=positive_int_arg("--position"), default=0)
    i.add_argument("--at-max", action="store_true", help="the head and position of the layer's largest kappa")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("check", help="verify a plan: exit 0 holds, 1 violated, 2 bad input, 3 undecided, 4 internal")
    c.add_argument("plan")
    c.add_argument("--cert-dir", default="certs", help="where certificates of PROVED plans are written")
    c.add_argument("--format", choices=("text", "json", "sarif", "junit"), default="text")
    c.add_argument("--output", help="write the report here (atomically) instead of stdout")
    c.add_argument("--solver", choices=Solver.values(), default=Solver.Z3.value)
    c.add_argument("--timeout-ms", type=milliseconds_arg("--timeout-ms"), default=10000,
                   help=f"per solver query, in [1, {MAX_TIMEOUT_MS}]")
    c.add_argument("--wall-timeout", type=seconds_arg("--wall-timeout"), default=300.0,
                   help=f"hard limit (s) for all solver queries, in (0, {MAX_WALL_TIMEOUT_S}]")
    c.add_argument("--smt-per-position", action="store_true", help="also one SMT query per key position (audits)")
    c.add_argument("--max-kl", help="also require the certified KL bound of every token <= this (docs/design.md 2.6); "
                   "the certificate records it")
    c.set_defaults(func=cmd_check)

    rc = sub.add_parser("recheck", help="re-decide a certificate independently (stdlib only)")
    rc.add_argument("certificate")
    rc.add_argument("--plan", help="the plan (default: the file the certificate names, next to it)")
    rc.set_defaults(func=cmd_recheck)

    rp = sub.add_parser("replay", help="replay the SMT-LIB2 queries of certificates with z3 or cvc5")
    rp.add_argument("certs", help="a certificate or a directory of *.cert.json")
    rp.add_argument("--solver", choices=Solver.values(), default=Solver.Z3.value)
    rp.add_argument("--timeout-ms", type=milliseconds_arg("--timeout-ms"), default=10000,
                    help=f"per solver query, in [1, {MAX_TIMEOUT_MS}]")
    rp.add_argument("--wall-timeout", type=seconds_arg("--wall-timeout"), default=300.0,
                    help=f"hard limit (s) for all solver queries of a certificate, in (0, {MAX_WALL_TIMEOUT_S}]")
    rp.add_argument("--dump", help="also write every query as a .smt2 file into this directory")
    rp.set_defaults(func=cmd_replay)

    ev = sub.add_parser("eval", help="quality and soundness of a plan vs the full-precision cache on held-out text")
    ev.add_argument("plan")
    ev.add_argument("--model", default="smollm2")
    ev.add_argument("--text", action="append", help="prose and/or code (their evaluation splits), or a UTF-8 text "
                    "file (repeatable; default prose and code)")
    ev.add_argument("--windows", type=positive_int_arg("--windows"), default=8)
    ev.add_argument("--prefix", type=positive_int_arg("--prefix"), default=512)
    ev.add_argument("--scored", type=positive_int_arg("--scored"), default=512)
    ev.add_argument("--format", choices=("text", "json"), default="text")
    ev.add_argument("--threads", type=positive_int_arg("--threads"), default=None)
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    rpt = sub.add_parser("report", help="figures of a plan: format heatmap (layers x positions, K and V), "
                         "bound-vs-actual scatter, Pareto plot from a benchmark result")
    rpt.add_argument("plan")
    rpt.add_argument("--out", required=True, help="directory for the PNG files")
    rpt.add_argument("--bench", help="benchmarks/quality.py's quality.json: adds the Pareto plots")
    rpt.add_argument("--eval-windows", type=int, default=1,
                     help="evaluation windows for the bound-vs-actual scatter (0: skip; needs the model)")
    rpt.add_argument("--text", default=Corpus.PROSE.value,
                     help="prose or code (their evaluation splits), or a UTF-8 text file (default prose)")
    rpt.add_argument("--model", default="smollm2")
    rpt.add_argument("--threads", type=positive_int_arg("--threads"), default=None)
    rpt.set_defaults(func=cmd_report)

    gen = sub.add_parser("generate", help="generate text with the plan's mixed-precision cache")
    gen.add_argument("plan")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=positive_int_arg("--max-new-tokens"), default=120)
    gen.add_argument("--on-overflow", choices=("error", "warn"), default="error",
                     help="past the plan's max_seq_len: stop with an error (default) or go on, marked UNCERTIFIED")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=positive_int_arg("--seed"), default=0)
    gen.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    gen.add_argument("--certify", action="store_true",
                     help="certify every step's attention error from what the cache stores (the plan's recorded "
                          "error norms) and print the largest certified bound per layer")
    gen.add_argument("--threads", type=positive_int_arg("--threads"), default=None)
    gen.set_defaults(func=cmd_generate)

    ce = sub.add_parser("certify-engine", help="is an engine's KV-cache setting safe for this model: the plan it "
                        "implies (llama.cpp -ctk/-ctv, vLLM fp8), checked, certified and evaluated, one exit code")
    ce.add_argument("report", help="the model's analysis report (hnfverify analyze)")
    ce.add_argument("--engine", required=True, choices=("llama.cpp", "vllm"))
    ce.add_argument("--ctk", choices=LLAMA_TYPES, help="llama.cpp: the K cache type (-ctk)")
    ce.add_argument("--ctv", choices=LLAMA_TYPES, help="llama.cpp: the V cache type (-ctv)")
    ce.add_argument("--kv-cache-dtype", dest="kv_cache_dtype", help="vLLM: fp8 or fp8_e4m3")
    ce.add_argument("--scales", help="vLLM: a JSON file {\"k_scale\": S, \"v_scale\": S}, S a number, one per layer, "
                    "or per layer one per KV head (default: 1.0, vLLM's uncalibrated scale)")
    ce.add_argument("--eps", help="also require Theorem 5.7 and each head's attention error <= eps (a budget)")
    ce.add_argument("--max-kl", help="also require the certified KL bound of every token <= this")
    ce.add_argument("--max-seq-len", type=positive_int_arg("--max-seq-len"), default=None)
    ce.add_argument("--out-dir", default="engine", help="directory for plan.json and certs/ (default ./engine)")
    ce.add_argument("--no-eval", action="store_true", help="plan, check and certify only (no model run)")
    ce.add_argument("--model", default="smollm2")
    ce.add_argument("--text", action="append", help="as for eval (default prose and code)")
    ce.add_argument("--windows", type=positive_int_arg("--windows"), default=8)
    ce.add_argument("--prefix", type=positive_int_arg("--prefix"), default=512)
    ce.add_argument("--scored", type=positive_int_arg("--scored"), default=512)
    ce.add_argument("--format", choices=("text", "json"), default="text")
    ce.add_argument("--threads", type=positive_int_arg("--threads"), default=None)
    ce.set_defaults(func=cmd_certify_engine)

    ex = sub.add_parser("export", help="the cheapest engine setting within a plan's certified bounds (llama.cpp "
                        "-ctk/-ctv) or vLLM's FP8 scale file")
    ex.add_argument("plan")
    ex.add_argument("--to", required=True, choices=("llama.cpp", "vllm"))
    ex.add_argument("--report", required=True, help="the analysis report the plan was made from")
    ex.add_argument("--out", help="vLLM: where the scale file goes (default kv_scales.json)")
    ex.set_defaults(func=cmd_export)

    f = sub.add_parser("fetch-model", help="download and convert a named model into the cache")
    f.add_argument("model", nargs="?", default="smollm2")
    f.set_defaults(func=cmd_fetch_model)

    s = sub.add_parser("splits", help="the built-in corpora's calibration / evaluation splits")
    s.set_defaults(func=cmd_splits)
    return p


def encodable(msg: str, stream) -> str:
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
        print(f"hnfverify: error: {encodable(str(e), err)}", file=err)
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
        print(f"hnfverify: error: {encodable(str(e), err)}", file=err)
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
        print(f"hnfverify: internal error: {type(e).__name__}: {encodable(first, err)} "
              f"(set HNFVERIFY_DEBUG=1 for a traceback)", file=err)
        return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
