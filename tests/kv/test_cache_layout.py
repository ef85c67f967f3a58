"""The fast layout (docs/design.md §4.2) against the cache that stores each chunk as it comes
(``reference_cache.py``, the old per-stream implementation): on random plans with a different format per
layer, head, K|V and segment, random chunk sizes, crops and beam reorders, every returned K/V, every
recorded error bound and the byte count must be bit-for-bit the same."""

import random
import zlib

import pytest
import torch

from hnfverify.core.formats import by_name
from hnfverify.errors import InvalidArgument
from hnfverify.kv.cache import MixedPrecisionCache
from hnfverify.kv.quant import dequantize, dequantize_into, quantize, quantize_values

from tests.kv.reference_cache import MixedPrecisionCache as ReferenceCache
from tests.kv.test_cache_semantics import D, synthetic_plan

TOKEN = ["fp16", "bf16", "fp32", "int8_t16", "int4_t16", "int3_t16", "int2_t16", "fp8_e4m3_t16", "fp8_e5m2_t16"]
REST = TOKEN + ["int4_c8", "int3_c8", "int2_c8", "int8_c8"]
RULES = [(4, 8), (0, 0), (1, 16), (4, 0), (0, 8), (1, 0), (4, 16)]


def mixed_plan(seed: int, sink: int, recent: int) -> dict:
    rnd = random.Random(seed)
    plan = synthetic_plan(uniform="fp16", sink=sink, recent=recent)
    for la in plan["layers"]:
        for h in la["heads"]:
            for kv in "KV":
                for seg in ("sink", "recent", "rest"):
                    name = rnd.choice(REST if seg == "rest" else TOKEN)
                    plan["formats"][name] = by_name(name).to_json()
                    h[kv][seg]["format"] = name
    return plan


def drive_both(plan: dict, seed: int, batch: int) -> int:
    """Drive the fast and the reference cache alike; assert equality after every update. Returns the steps."""
    n_layers, heads = len(plan["layers"]), len(plan["layers"][0]["heads"])
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    fast, ref = MixedPrecisionCache.from_plan(plan), ReferenceCache.from_plan(plan)
    t = steps = 0
    while t < 60:
        n = min(rnd.choice([1, 1, 1, 2, 5]) if t else rnd.choice([1, 3, 7, 21]), 64 - t)
        k = torch.randn(batch, heads, n, D, generator=g) * 2
        v = torch.randn(batch, heads, n, D, generator=g)
        for li in range(n_layers):
            kf, vf = fast.update(k, v, li)
            kr, vr = ref.update(k, v, li)
            assert torch.equal(kf, kr) and torch.equal(vf, vr), (seed, t, li)
            ef, er = fast.layers[li].error_bounds(), ref.layers[li].error_bounds()
            assert torch.equal(ef[0], er[0]) and torch.equal(ef[1], er[1]), (seed, t, li, "recorded norms")
        assert fast.nbytes() == ref.nbytes(), (seed, t)
        assert fast.capacity_nbytes() >= fast.nbytes()
        t += n
        if n > 1 and t > 8 and rnd.random() < 0.5:           # a rejected draft: crop back, where allowed
            c = rnd.randint(1, n)                              # n: back to the layout point
            try:
                ref.crop(-c)
            except InvalidArgument:
                with pytest.raises(InvalidArgument):
                    fast.crop(-c)
            else:
                fast.crop(-c)
                t -= c
        if batch > 1 and rnd.random() < 0.3:                 # beam search reorders the batch
            idx = torch.tensor([rnd.randrange(batch) for _ in range(batch)])
            fast.reorder_cache(idx)
            ref.reorder_cache(idx)
        steps += 1
    assert fast.monitor == ref.monitor, (fast.monitor, ref.monitor)
    return steps


@pytest.mark.parametrize("seed", range(21))
def test_fast_layout_equals_the_reference_cache(seed):
    sink, recent = RULES[seed % len(RULES)]
    assert drive_both(mixed_plan(seed, sink, recent), seed, batch=1 + seed % 3) > 5


@pytest.mark.parametrize("spec", ["int4_t16", "fp16,rest=int4_c8", "int8_t16,K.rest=int4_c8", "fp8_e4m3_t16,rest=int2_c8",
                                  "int3_t16,K.rest=int3_c8"])
@pytest.mark.parametrize("sink,recent", [(4, 8), (0, 0), (1, 16), (4, 0)])
def test_fast_layout_equals_the_reference_cache_uniform(spec, sink, recent):
    seed = zlib.crc32(f"{spec} {sink} {recent}".encode()) % 1000       # the same every run (not hash())
    drive_both(synthetic_plan(uniform=spec, sink=sink, recent=recent), seed, batch=2)


@pytest.mark.parametrize("name", REST)
def test_dequantize_into_and_quantize_values_give_dequantize_bit_for_bit(name):
    fmt = by_name(name)
    x = torch.randn(2, 3, 24, D, generator=torch.Generator().manual_seed(3)) * 3
    p, y = quantize_values(x, fmt)
    assert torch.equal(y, dequantize(p))
    big = torch.full((2, 5, 30, D), float("nan"))
    dequantize_into(p, big[:, 1:4, 3:27])                   # a strided destination, as the cache writes
    assert torch.equal(big[:, 1:4, 3:27], dequantize(p))
    if fmt.granularity == "channel":                         # a short first group (it starts at the sink)
        part, yp = quantize_values(x[:, :, :5], fmt, group_tokens=5)
        dequantize_into(part, big[:, 1:4, 0:5])
        assert torch.equal(big[:, 1:4, 0:5], dequantize(part)) and torch.equal(yp, dequantize(part))


def test_a_layer_left_out_of_a_forward_pass_is_refused():
    plan = synthetic_plan(uniform="int4_t16", sink=4, recent=8)
    cache = MixedPrecisionCache.from_plan(plan)
    x = torch.randn(1, 2, 6, D)
    for li in range(len(plan["layers"])):
        cache.update(x, x, li)
    cache.update(x[:, :, :1], x[:, :, :1], 0)
    with pytest.raises(InvalidArgument, match="updated once per forward pass"):
        cache.update(x[:, :, :1], x[:, :, :1], 0)            # layer 0 twice, the others not at all
