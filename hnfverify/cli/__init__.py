"""The command line: ``hnfverify <command>``."""

from .app import build_parser, main, print_plan, run

__all__ = ["build_parser", "main", "print_plan", "run"]
