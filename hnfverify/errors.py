"""Named errors. Every error a user can cause maps to one of these and an exit code.

Messages name the field or input, what is allowed, and what was received.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VIOLATED = 1
EXIT_USAGE = 2
EXIT_UNDECIDED = 3
EXIT_INTERNAL = 4


class HnfError(Exception):
    """Base class: a problem the user can fix. Carries the CLI exit code."""

    exit_code = EXIT_USAGE


class InvalidArgument(HnfError, ValueError):
    """A command-line option or API argument is out of its allowed set or range."""


class InputError(HnfError):
    """An input file or text is missing, empty or malformed."""


class ModelError(HnfError):
    """A model cannot be resolved, fetched, loaded or analyzed (e.g. it has no attention layers)."""


class UnsupportedModel(ModelError):
    """The model uses an attention variant the exact analysis does not cover."""


class PlanInfeasible(HnfError):
    """No plan satisfies the request (exit code 2): the message says what the best achievable is."""


class PlanError(InputError):
    """An invalid plan file. ``problems`` lists every (json path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.problems = problems
        head = f"plan {source!r} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        shown = problems[:50]
        lines = [f"  {p}: {m}" for p, m in shown]
        if len(problems) > len(shown):
            lines.append(f"  ... and {len(problems) - len(shown)} more")
        super().__init__("\n".join([head] + lines))
