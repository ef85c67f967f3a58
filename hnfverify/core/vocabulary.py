"""The small closed vocabularies of hnfverify, defined once: each member *is* its string value (it
compares, hashes, formats and serializes as that string), so plans, certificates and messages read
exactly as before. ``values()`` gives the plain strings, for the CLI's choices and messages."""

from __future__ import annotations

from enum import Enum

from ..errors import EXIT_OK, EXIT_UNDECIDED, EXIT_VIOLATED


class Vocabulary(str, Enum):
    """A ``str`` Enum whose members print as their values (``f"{Solver.Z3}"`` is ``z3``)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Objective(Vocabulary):
    """What ``--avg-bits``' greedy sequence lowers (docs/design.md §3.1)."""
    FISHER = "fisher"
    LINEAR = "linear"
    LAYERS = "layers"
    END_TO_END = "end_to_end"


class Curvature(Vocabulary):
    """The curvature the analysis measures and the planner uses: exact (certified) or seed (ablation)."""
    EXACT = "exact"
    SEED = "seed"


class Solver(Vocabulary):
    """The SMT solvers that decide and replay the queries."""
    Z3 = "z3"
    CVC5 = "cvc5"


class Corpus(Vocabulary):
    """The built-in text corpora (calibration and evaluation splits)."""
    PROSE = "prose"
    CODE = "code"


class Granularity(Vocabulary):
    """How a format shares its scale: not at all (floats), per token, per channel group of tokens."""
    NONE = "none"
    TOKEN = "token"
    CHANNEL = "channel"


_RANK = {"PROVED": 0, "UNKNOWN": 1, "REFUTED": 2}


class Verdict(Vocabulary):
    """The three-valued verdict of an obligation or a plan, ordered PROVED < UNKNOWN < REFUTED (a plan's
    verdict is the largest of its obligations'); ``exit_code`` is what ``hnfverify check`` returns."""
    PROVED = "PROVED"
    UNKNOWN = "UNKNOWN"
    REFUTED = "REFUTED"

    def __lt__(self, other):
        return _RANK[self.value] < _RANK[other.value] if isinstance(other, Verdict) else NotImplemented

    def __le__(self, other):
        return _RANK[self.value] <= _RANK[other.value] if isinstance(other, Verdict) else NotImplemented

    def __gt__(self, other):
        return _RANK[self.value] > _RANK[other.value] if isinstance(other, Verdict) else NotImplemented

    def __ge__(self, other):
        return _RANK[self.value] >= _RANK[other.value] if isinstance(other, Verdict) else NotImplemented

    @property
    def exit_code(self) -> int:
        return {"PROVED": EXIT_OK, "UNKNOWN": EXIT_UNDECIDED, "REFUTED": EXIT_VIOLATED}[self.value]
