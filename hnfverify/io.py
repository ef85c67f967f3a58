"""Atomic file output: write to a temporary file in the same directory, fsync, then rename.

A reader never sees a half-written file, and a failed run leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)      # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


MAX_INT_DIGITS = 30        # integer literals in plans and certificates: lengths, counts, indices


def parse_json_int(s: str) -> int:
    """``json.loads(parse_int=...)``: refuse integer literals longer than MAX_INT_DIGITS digits (before
    Python's own 4300-digit limit turns them into a bare ValueError)."""
    digits = len(s) - s.startswith("-")
    if digits > MAX_INT_DIGITS:
        from .errors import InputError

        raise InputError(f"an integer literal of {digits} digits ({s[:12]}...) is too long: integers have at most "
                         f"{MAX_INT_DIGITS} digits (write large numbers as decimal strings)")
    return int(s)


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate_path(obj: Any) -> str | None:
    """The JSON path of the first string (key or value) of ``obj`` with a lone surrogate (JSON ``"\ud800"``:
    legal JSON, but no UTF-8 encoding exists, so it cannot be hashed or written), else None.
    Iterative, so any nesting json.loads accepted is fine."""
    stack = [(obj, "$")]
    while stack:
        o, path = stack.pop()
        if isinstance(o, str):
            if _has_surrogate(o):
                return path
        elif isinstance(o, dict):
            for k, v in reversed(list(o.items())):
                if isinstance(k, str) and _has_surrogate(k):
                    return f"{path}[key {k!r}]"            # repr escapes the surrogate
                stack.append((v, f"{path}.{k}"))
        elif isinstance(o, list):
            for i in range(len(o) - 1, -1, -1):
                stack.append((o[i], f"{path}[{i}]"))
    return None


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, fixed separators, UTF-8, trailing newline: the same object gives the same bytes."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    text = json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def shown_path(path) -> str:
    """A path for a message: repr (control characters and surrogates escaped), long ones shortened."""
    path = str(path)
    return repr(path) if len(path) <= 200 else repr(path[:120] + "..." + path[-40:]) + f" ({len(path)} characters)"
