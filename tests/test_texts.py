import pytest

from hnfverify.errors import InputError, InvalidArgument
from hnfverify.models import ByteTokenizer
from hnfverify.texts import CORPORA, disjoint, documents, token_windows


@pytest.mark.parametrize("corpus", CORPORA)
def test_calibration_and_evaluation_splits_are_disjoint_and_nonempty(corpus):
    cal, ev = documents(corpus, "calib"), documents(corpus, "eval")
    assert cal and ev and disjoint(cal, ev)
    assert [d.doc_id for d in cal] == sorted(d.doc_id for d in cal)


def test_windows_are_deterministic_with_stable_identity():
    tok = ByteTokenizer()
    a = token_windows(tok, "prose", max_tokens=300, window=100)
    b = token_windows(tok, "prose", max_tokens=300, window=100)
    assert a.windows == b.windows and a.sha256() == b.sha256()
    assert len(a.windows) == 3 and all(len(w) == 100 for w in a.windows)
    ev = token_windows(tok, "prose", split="eval", max_tokens=300, window=100)
    assert ev.sha256() != a.sha256()
    ident = a.identity()
    assert ident["split"] == "calib" and ident["n_tokens"] == 300 and len(ident["token_ids_sha256"]) == 64


def test_small_budget_gives_one_short_window():
    w = token_windows(ByteTokenizer(), "code", max_tokens=50, window=512)
    assert len(w.windows) == 1 and w.window == 50


def test_user_file_and_bad_inputs(tmp_path):
    tok = ByteTokenizer()
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 20)
    w = token_windows(tok, str(f), max_tokens=64, window=32)
    assert w.split == "file" and len(w.windows) == 2
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        token_windows(tok, str(empty), max_tokens=64, window=32)
    with pytest.raises(InputError, match="no such file"):
        token_windows(tok, str(tmp_path / "missing.txt"), max_tokens=64, window=32)
    with pytest.raises(InvalidArgument, match="--max-tokens"):
        token_windows(tok, "prose", max_tokens=0, window=32)
    short = tmp_path / "s.txt"
    short.write_text("abc")
    with pytest.raises(InputError, match="fewer than one window"):
        token_windows(tok, str(short), max_tokens=64, window=32)
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not UTF-8"):
        token_windows(tok, str(binary), max_tokens=64, window=32)
