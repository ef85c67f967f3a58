"""Real text that ships with Python, split deterministically into calibration and evaluation.

Two built-in corpora, read from the running interpreter (no hub, no download):

* ``prose`` — the English help topics of ``pydoc_data.topics`` (one document per topic);
* ``code``  — the standard library's top-level ``*.py`` modules (one document per file).

Split rule: a document belongs to the **calibration** split when the first byte of
``sha256("<corpus>:<document id>")`` is even, otherwise to the **evaluation** split. The rule
depends only on the document's id, so the two splits never share a document, on any Python.
Documents in a split are concatenated in sorted-id order, separated by a blank line, and
tokenized; the token stream is cut into windows. The identity of what was analyzed is the
sha256 of the int32 little-endian token ids actually used, printed by ``analyze``.

A user file (``--calib FILE``) is one document; it has no split.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .core.vocabulary import Corpus
from .errors import InputError, InvalidArgument

CORPORA = Corpus.values()
SPLITS = ("calib", "eval")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def _split_of(corpus: str, doc_id: str) -> str:
    first = hashlib.sha256(f"{corpus}:{doc_id}".encode()).digest()[0]
    return "calib" if first % 2 == 0 else "eval"


def _prose_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(k, v) for k, v in sorted(topics.items())]


def _code_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.glob("*.py")):
        try:
            docs.append(Document(p.name, p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def documents(corpus: str, split: str) -> list[Document]:
    """The documents of one built-in corpus and split, in their canonical (sorted) order."""
    if corpus not in CORPORA:
        raise InvalidArgument(f"corpus must be one of {list(CORPORA)} or a file path, got {corpus!r}")
    if split not in SPLITS:
        raise InvalidArgument(f"split must be one of {list(SPLITS)}, got {split!r}")
    docs = _prose_documents() if corpus == "prose" else _code_documents()
    return [d for d in docs if _split_of(corpus, d.doc_id) == split]


@dataclass(frozen=True)
class TokenWindows:
    """Token windows cut from one text source.

    ``windows``: list of equal-length lists of token ids, shape (n_windows, window).
    """

    source: str            # "prose", "code" or the file path
    split: str             # "calib", "eval" or "file"
    windows: list[list[int]]
    n_documents: int

    @property
    def window(self) -> int:
        return len(self.windows[0])

    @property
    def n_tokens(self) -> int:
        return len(self.windows) * self.window

    def sha256(self) -> str:
        h = hashlib.sha256()
        for w in self.windows:
            h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in w))
        return h.hexdigest()

    def identity(self) -> dict:
        return {
            "source": self.source,
            "split": self.split,
            "n_windows": len(self.windows),
            "window": self.window,
            "n_tokens": self.n_tokens,
            "n_documents": self.n_documents,
            "token_ids_sha256": self.sha256(),
        }


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
    return [int(i) for i in ids]


def token_windows(
    tokenizer,
    source: str,
    *,
    split: str = "calib",
    max_tokens: int,
    window: int,
) -> TokenWindows:
    """Tokenize ``source`` (a corpus name or a text file) and cut ``max_tokens`` into windows.

    If ``max_tokens < window`` a single window of ``max_tokens`` is used. Raises ``InputError``
    when the text is empty or too short for one window.
    """
    if max_tokens <= 0:
        raise InvalidArgument(f"--max-tokens must be a positive integer, got {max_tokens}")
    if window <= 1:
        raise InvalidArgument(f"--window must be at least 2 tokens, got {window}")
    window = min(window, max_tokens)
    n_windows = max_tokens // window
    need = n_windows * window

    if source in CORPORA:
        docs = documents(source, split)
        used_split = split
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"calibration text {source!r}: no such file (built-in corpora: {list(CORPORA)})")
        if not path.is_file():
            raise InputError(f"calibration text {source!r} is not a regular file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"calibration text {source!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise InputError(f"calibration text {source!r} is empty")
        docs = [Document(path.name, text)]
        used_split = "file"

    ids: list[int] = []
    used_docs = 0
    for d in docs:
        if len(ids) >= need:
            break
        if ids:
            ids.extend(_encode(tokenizer, "\n\n"))
        ids.extend(_encode(tokenizer, d.text))
        used_docs += 1
    if len(ids) < need:
        if len(ids) < 2:
            raise InputError(f"calibration text {source!r} has no tokens")
        if len(ids) < window:
            raise InputError(
                f"calibration text {source!r} has {len(ids)} tokens, fewer than one window of {window}; "
                f"lower --max-tokens or --window"
            )
        n_windows = len(ids) // window
        need = n_windows * window
    ids = ids[:need]
    wins = [ids[i * window:(i + 1) * window] for i in range(n_windows)]
    return TokenWindows(source=source, split=used_split, windows=wins, n_documents=used_docs)


def split_table() -> list[tuple[str, str, int, int]]:
    """(corpus, split, documents, characters) for the documentation."""
    rows = []
    for c in CORPORA:
        for s in SPLITS:
            docs = documents(c, s)
            rows.append((c, s, len(docs), sum(len(d.text) for d in docs)))
    return rows


def disjoint(a: Sequence[Document], b: Sequence[Document]) -> bool:
    return not ({d.doc_id for d in a} & {d.doc_id for d in b})
