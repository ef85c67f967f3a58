"""The runtime cache stores exactly what docs/design.md §4 says, for every way it can be driven: empty
recent windows, channel groups aligned as the analysis aligns them, multi-token chunks evicted relative
to their oldest query, cropped drafts, and sequences past max_seq_len. Each test drives
``MixedPrecisionCache.update`` with random K/V and compares what it returns with an independent
reading of the §4 table (this file's ``expected``, built only from ``kv.quant.roundtrip``).
These tests were committed before the fix and failed on the old cache (see each docstring).
"""

import importlib.util
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from hnfverify.core.formats import by_name
from hnfverify.kv.cache import MixedPrecisionCache
from hnfverify.kv.quant import quantize, dequantize, roundtrip

HERE = Path(__file__).resolve().parents[1]
D = 16          # head_dim of the synthetic report
G = 8           # its analysis channel group


def synthetic_plan(**kw):
    from hnfverify.planning import PlanRequest, plan_from_report

    spec = importlib.util.spec_from_file_location("mp", HERE / "data" / "make_planted.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary, arrays = mod.synthetic_report(0)
    kw.setdefault("max_seq_len", 64)
    return plan_from_report(summary, arrays, PlanRequest(**kw))


def set_formats(plan, **segs):
    """segs: e.g. K_recent="int2_t16": that segment's format in every layer and head."""
    for key, name in segs.items():
        kv, seg = key.split("_")
        plan["formats"][name] = by_name(name).to_json()
        for la in plan["layers"]:
            for h in la["heads"]:
                h[kv][seg]["format"] = name
    return plan


def _rt_group(x, fmt):
    """Round trip of one channel group of any size m <= G (m tokens, d channels)."""
    return dequantize(quantize(x, fmt, group_tokens=x.shape[-2]))


def expected(x, s, r, fmts, a):
    """What a chunk whose oldest query is ``a`` reads for positions [0, a) of one stream, per
    docs/design.md §4: x (T, d) exact values; fmts: segment -> Format."""
    out = x.clone()
    rest = fmts["rest"]
    recent_start = max(min(s, a), a - r + 1) if r > 0 else a
    if rest.granularity == "channel":
        rest_end = max(min(s, a), (recent_start // rest.group) * rest.group)
    else:
        rest_end = recent_start
    rec = roundtrip(x, fmts["recent"]) if r > 0 else x.clone()
    sink_end = min(s, a)
    if sink_end:
        out[:sink_end] = roundtrip(x[:sink_end], fmts["sink"])
    if rest_end > sink_end:
        if rest.granularity == "channel":
            t = sink_end
            while t < rest_end:
                e = min(rest_end, (t // rest.group + 1) * rest.group)
                out[t:e] = _rt_group(rec[t:e], rest)
                t = e
        else:
            out[sink_end:rest_end] = roundtrip(rec[sink_end:rest_end], rest)
    out[rest_end:a] = rec[rest_end:a]
    return out


def drive(plan, x, chunks, crop_after=None):
    """Feed layer 0 of a cache with x (B=1, H, T, d) in ``chunks`` [(a, b)]; yields (a, returned keys)."""
    cache = MixedPrecisionCache.from_plan(plan)
    for a, b in chunks:
        k, _ = cache.update(x[:, :, a:b], x[:, :, a:b] * 0.5, 0)
        yield a, k
        if crop_after and b in crop_after:
            cache.crop(-crop_after[b])


def _fmts(plan, kv="K"):
    h = plan["layers"][0]["heads"][0][kv]
    return {s: by_name(h[s]["format"]) for s in ("sink", "recent", "rest")}


def _check(plan, x, chunks, **kw):
    s, r = plan["rule"]["sink"], plan["rule"]["recent"]
    f = _fmts(plan)
    n = 0
    for a, k in drive(plan, x, chunks, **kw):
        for h in range(x.shape[1]):
            want = expected(x[0, h], s, r, f, a)
            got = k[0, h, :a]
            assert torch.equal(got, want[:a]), (a, h, (got - want[:a]).abs().amax(-1).nonzero().flatten().tolist())
        n += 1
    assert n == len(chunks)


X = torch.randn(1, 2, 64, D, generator=torch.Generator().manual_seed(0)) * 2


def test_recent_zero_stores_each_position_once_in_the_rest_format():
    """Failed before the fix: every position was first quantized with the (unused, INT2) recent format
    and re-quantized to the FP32 rest on eviction, so the returned past keys carried INT2 errors."""
    plan = set_formats(synthetic_plan(uniform="fp32", sink=4, recent=0), K_recent="int2_t16")
    _check(plan, X, [(0, 10)] + [(i, i + 1) for i in range(10, 30)])
    for a, k in drive(plan, X, [(0, 10), (10, 11)]):
        if a == 10:
            assert torch.equal(k[0, :, 4:10], X[0, :, 4:10])          # FP32, stored once


def test_channel_groups_are_aligned_as_the_analysis_aligns_them():
    """The analysis measures d_channel over groups [gG, (g+1)G); the cache must quantize the same groups
    (the first one starting at S). Failed before the fix: groups were aligned at S = 4 ([4, 12), ...)."""
    plan = set_formats(synthetic_plan(uniform="fp16,K.rest=int4_c8", sink=4, recent=8))
    _check(plan, X, [(0, 12)] + [(i, i + 1) for i in range(12, 48)])


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_multi_token_chunks_evict_relative_to_their_oldest_query(chunk):
    """A chunk's oldest query must not read the rest format at distance < R. Failed before the fix: the
    cache evicted relative to the chunk's newest token."""
    plan = set_formats(synthetic_plan(uniform="int8_t16,K.rest=int2_t16", sink=1, recent=8))
    chunks = [(0, 20)] + [(a, min(a + chunk, 64)) for a in range(20, 64, chunk)]
    _check(plan, X, chunks)


def test_a_cropped_draft_leaves_the_cache_as_if_it_never_happened():
    """Assisted decoding writes a draft chunk and crops what was rejected. Failed before the fix: the
    cache was not croppable."""
    plan = set_formats(synthetic_plan(uniform="int8_t16,K.rest=int4_c8", sink=4, recent=8))
    cache = MixedPrecisionCache.from_plan(plan)
    ref = MixedPrecisionCache.from_plan(plan)
    cache.update(X[:, :, :20], X[:, :, :20], 0)
    ref.update(X[:, :, :20], X[:, :, :20], 0)
    draft = torch.randn(1, 2, 5, D, generator=torch.Generator().manual_seed(3))
    cache.update(draft, draft, 0)                      # positions 20..24, rejected from 22 on
    cache.crop(-3)
    assert cache.get_seq_length() == 22
    ref.update(draft[:, :, :2], draft[:, :, :2], 0)
    for i in range(22, 40):
        k1, v1 = cache.update(X[:, :, i:i + 1], X[:, :, i:i + 1], 0)
        k2, v2 = ref.update(X[:, :, i:i + 1], X[:, :, i:i + 1], 0)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert cache.nbytes() == ref.nbytes()


def test_crop_into_stored_rest_positions_is_refused():
    plan = set_formats(synthetic_plan(uniform="int8_t16,K.rest=int4_c8", sink=4, recent=8))
    cache = MixedPrecisionCache.from_plan(plan)
    cache.update(X[:, :, :40], X[:, :, :40], 0)
    from hnfverify.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="crop"):
        cache.crop(-20)


def test_sequences_past_max_seq_len_are_refused_or_marked():
    """Failed before the fix: the cache ran past the plan's max_seq_len silently, voiding the guarantee."""
    from hnfverify.errors import InvalidArgument

    plan = synthetic_plan(uniform="int8_t16", sink=4, recent=8, max_seq_len=32)
    cache = MixedPrecisionCache.from_plan(plan)
    cache.update(X[:, :, :30], X[:, :, :30], 0)
    cache.update(X[:, :, 30:32], X[:, :, 30:32], 0)
    with pytest.raises(InvalidArgument, match="max_seq_len"):
        cache.update(X[:, :, 32:33], X[:, :, 32:33], 0)
    warn = MixedPrecisionCache.from_plan(plan, on_overflow="warn")
    warn.update(X[:, :, :30], X[:, :, :30], 0)
    assert warn.certified
    with pytest.warns(UserWarning, match="max_seq_len"):
        warn.update(X[:, :, 30:34], X[:, :, 30:34], 0)
    assert not warn.certified


def test_accounted_bytes_equal_the_cache_after_prefill_and_steps():
    """The planner's claim, the accounting and the cache's real bytes agree (docs/design.md §4)."""
    from hnfverify.core.semantics import norm_bits
    from hnfverify.evaluation import accounted_bytes, accounting_units

    for spec, s, r in (("int8_t16,K.rest=int4_c8", 4, 8), ("int4_t16", 1, 0), ("fp16,rest=int2_c8", 0, 16),
                       ("lm4_t16_h,K.rest=int3_t16_h,V.rest=lm2_t16_h", 4, 8), ("int3_t16_h", 1, 0)):
        plan = synthetic_plan(uniform=spec, sink=s, recent=r)
        n_l = len(plan["layers"])
        cache = MixedPrecisionCache.from_plan(plan)
        for li in range(n_l):
            cache.update(X[:, :, :30], X[:, :, :30], li)
        units, nb = accounting_units(plan), norm_bits(plan["rule"])
        assert cache.nbytes() == accounted_bytes(units, D, 30, nb), spec
        for i in range(30, 64):
            for li in range(n_l):
                cache.update(X[:, :, i:i + 1], X[:, :, i:i + 1], li)
            assert cache.nbytes() == accounted_bytes(units, D, i + 1, nb), (spec, i)
        assert cache.nbytes() * 8 == int(Fraction(plan["claims"]["cache_bits_at_max_seq_len"])), spec


@pytest.mark.parametrize("spec,s,r", [("int4_t16", 4, 0), ("fp16,rest=int4_c8", 4, 0), ("int8_t16,rest=int2_t16", 0, 8),
                                      ("fp16,rest=int4_c8", 1, 16), ("int8_t16,rest=lm3_t16_h", 1, 8)])
def test_draft_and_crop_equal_never_drafting(spec, s, r):
    """Crop after a draft chunk, for every kind of stream (R = 0 per-token and channel rests included)."""
    plan = synthetic_plan(uniform=spec, sink=s, recent=r)
    cache, ref = MixedPrecisionCache.from_plan(plan), MixedPrecisionCache.from_plan(plan)
    for c in (cache, ref):
        c.update(X[:, :, :21], X[:, :, :21], 0)
    i = 21
    while i < 60:
        draft = torch.randn(1, 2, 4, D, generator=torch.Generator().manual_seed(i))
        cache.update(draft, draft, 0)
        cache.crop(-3)                                   # keep one drafted token
        ref.update(draft[:, :, :1], draft[:, :, :1], 0)
        k1, _ = cache.update(X[:, :, i + 1:i + 2], X[:, :, i + 1:i + 2], 0)
        k2, _ = ref.update(X[:, :, i + 1:i + 2], X[:, :, i + 1:i + 2], 0)
        assert torch.equal(k1, k2), (spec, i)
        assert cache.nbytes() == ref.nbytes()
        i += 2
