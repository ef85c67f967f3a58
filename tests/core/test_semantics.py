"""hnfverify.core.semantics: every state a cache driven by any chunk schedule reads is among the states the
obligations cover (docs/design.md §4-5), and the accounting follows the layout. Torch-free."""

from hypothesis import given, strategies as st

from hnfverify.core.semantics import READER, State, StreamRule, layout, read_intervals, read_state, reachable


class _F:
    def __init__(self, granularity="token", group=16):
        self.granularity, self.group = granularity, group


def _rule(s, r, g):
    rest = _F("channel", g) if g else _F()
    return StreamRule(s, r, {"sink": _F(), "recent": _F(), "rest": rest})


@st.composite
def schedules(draw):
    s = draw(st.integers(0, 6))
    r = draw(st.integers(0, 9))
    g = draw(st.sampled_from([None, 1, 2, 4, 8]))
    t = draw(st.integers(1, 40))
    first = draw(st.integers(1, t))
    chunks, a = [(0, first)], first
    while a < t:
        n = draw(st.integers(1, 4))
        chunks.append((a, min(t, a + n)))
        a = min(t, a + n)
    return _rule(s, r, g), t, chunks


@given(schedules())
def test_every_read_state_is_covered_by_an_obligation(case):
    rule, t, chunks = case
    covered = {}
    for state, lo, hi in reachable(rule, t):
        covered[state] = (lo, hi)
    for a, b in chunks:
        lay = layout(rule, a)
        for i in range(a, b):
            for pos in range(i + 1):
                st_ = read_state(rule, lay, pos, i)
                if st_ is None:
                    assert pos >= a
                    continue
                if not rule.chain(st_):                 # stored exactly: nothing to cover
                    continue
                assert st_ in covered, (st_, pos, i, rule.sink, rule.recent, rule.channel_group, t)
                lo, hi = covered[st_]
                assert lo <= pos < hi, (st_, pos, i, lo, hi)
                if st_ is State.REST:                   # never the rest format within the window
                    assert i - pos >= rule.recent
                if st_ is State.RECENT:
                    assert i - pos < rule.recent
            # the piecewise form agrees with the pointwise one
            pieces = read_intervals(rule, lay, i)
            assert sum(hi - lo for lo, hi, _ in pieces) == i + 1
            for lo, hi, sv in pieces:
                for pos in range(lo, hi):
                    assert read_state(rule, lay, pos, i) == sv


def test_readers_of_each_state():
    assert READER[State.RECENT_FAR] == READER[State.REST] == "rest"
    rule = _rule(4, 0, None)
    assert rule.chain(State.RECENT_FAR) == () and len(rule.chain(State.REST)) == 1
    assert [s for s, _, _ in reachable(rule, 40)] == [State.SINK, State.REST]
    assert [s for s, _, _ in reachable(_rule(4, 8, 8), 40)] == [State.SINK, State.RECENT, State.RECENT_FAR, State.REST]


@given(st.integers(0, 6), st.integers(0, 9), st.sampled_from([None, 2, 4, 8]), st.integers(1, 60))
def test_counts_hold_every_position_once_and_no_recent_value_as_fp32(s, r, g, n):
    """docs/design.md §4 accounting: with R > 0 the positions past the window whose channel group is
    incomplete stay in the recent format (nothing is held as FP32); with R = 0 they are exact (FP32)."""
    from hnfverify.core.semantics import stored_counts

    rule = _rule(s, r, g)
    c = stored_counts(rule, n)
    assert c["sink"] + c["recent"] + c["rest"] + c["pending"] == n
    assert sum(c["rest_groups"]) == (c["rest"] if g else 0)
    if r > 0:
        assert c["pending"] == 0
        lay = layout(rule, n - 1)
        assert c["recent"] == (n - lay.rest_end if n > s else 0)
