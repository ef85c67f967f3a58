"""The command line: ``hnfverify <command>``; every command is ``(args, out, err) -> exit code``.

    parser              the argument parser, ``run`` (in-process, returns the exit code) and ``main``
    options             argument types and shared checks (numbers, timeouts, output paths, threads)
    render              text renderers: analysis summary, plan table, evaluation table
    analysis_commands   analyze, inspect, fetch-model, splits
    plan_commands       plan, show, report
    check_commands      check, recheck, replay
    runtime_commands    eval, generate
"""

from .parser import build_parser, main, run
from .render import print_plan

__all__ = ["build_parser", "main", "print_plan", "run"]
