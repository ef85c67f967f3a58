"""Argument types and shared checks of the command line: integers, numbers, timeouts, output paths, threads."""

from __future__ import annotations

import argparse
import math
import os

from ..errors import HnfError, InvalidArgument
from ..io import shown_path


def positive_int_arg(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        return v
    return parse


def set_threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported elsewhere
        pass


def fraction_arg(name: str, value: str | None):
    if value is None:
        return None
    from ..core.numbers import parse_number

    try:
        return parse_number(value.strip(), name)
    except HnfError:
        raise InvalidArgument(f"{name} must be a finite number such as 0.5, 1e3 or 1/30, got {value!r}") from None


MAX_WALL_TIMEOUT_S = 86400              # one day
MAX_TIMEOUT_MS = 86_400_000             # one day, per solver query (z3 takes an unsigned 32-bit value)


def seconds_arg(name: str):
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


def milliseconds_arg(name: str):
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


def check_timeouts(args) -> None:
    """The same ranges for callers that build ``args`` without the parser."""
    w, t = args.wall_timeout, args.timeout_ms
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and 0 < w <= MAX_WALL_TIMEOUT_S):
        raise InvalidArgument(f"--wall-timeout must be a finite number of seconds > 0 and <= {MAX_WALL_TIMEOUT_S}, "
                              f"got {w!r}")
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_TIMEOUT_MS:
        raise InvalidArgument(f"--timeout-ms must be a whole number of milliseconds in [1, {MAX_TIMEOUT_MS}] "
                              f"(at most {MAX_WALL_TIMEOUT_S} s), got {t!r}")


def name_limits(directory: str) -> tuple[int, int]:
    try:
        return os.pathconf(directory, "PC_NAME_MAX"), os.pathconf(directory, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 255, 4096


def check_output_target(option: str, path: str, *, directory: bool, example: str) -> None:
    """Refuse, before any (possibly long) work, an output path that cannot be written: a file where a
    directory is needed or the reverse, a FIFO or device (atomic writes rename a file onto the path),
    a parent that is a file or not writable, names longer than the file system takes."""
    if not path:
        raise InvalidArgument(f"{option} must not be empty; give {example}")
    if "\0" in path:
        raise InvalidArgument(f"{option} {shown_path(path)}: a path cannot hold a NUL character")
    p = os.path.abspath(path)
    if directory:
        if os.path.lexists(p) and not os.path.isdir(p):
            raise InvalidArgument(f"{option} {shown_path(path)} exists and is not a directory; give {example}")
    else:
        if os.path.isdir(p):
            raise InvalidArgument(f"{option} {shown_path(path)} is a directory; give {example}")
        if os.path.lexists(p) and not os.path.isfile(p):
            raise InvalidArgument(f"{option} {shown_path(path)} is not a regular file (a FIFO, device or socket?); the "
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
        raise InvalidArgument(f"{option} {shown_path(path)}: {shown_path(anc)} is not a directory; give {example}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{option} {shown_path(path)}: no permission to write in {shown_path(anc)}")
    name_max, path_max = name_limits(anc)
    for name in created:
        n, tmp = len(os.fsencode(name)), name.endswith(".XXXXXXXX.tmp")
        if n > name_max:
            n, limit = (n - 14, name_max - 14) if tmp else (n, name_max)
            raise InvalidArgument(f"{option} {shown_path(path)}: a {'file' if tmp else 'directory'} name of {n} bytes is "
                                  f"too long (at most {limit} here)")
    if len(os.fsencode(p)) + 40 > path_max:
        raise InvalidArgument(f"{option} {shown_path(path)}: the path is too long (at most about {path_max - 40} bytes)")


def check_text(text: str) -> None:
    """--text of eval and report: a built-in corpus (its evaluation split) or an existing text file."""
    from pathlib import Path

    from ..core.vocabulary import Corpus

    if text not in Corpus.values() and not Path(text).is_file():
        raise InvalidArgument(f"--text must be prose or code (the evaluation splits) or a text file, got {text!r}")
