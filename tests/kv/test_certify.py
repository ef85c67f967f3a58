"""Run-time certification (docs/design.md §2.4b, §4.1): the recorded error norms bound the true errors, and
the certified bound computed from what the cache stores bounds the real attention error at every step."""

import importlib.util
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hnfverify.errors import InvalidArgument
from hnfverify.kv import norms
from hnfverify.kv.cache import MixedPrecisionCache
from hnfverify.kv.certify import certify, runtime_bounds

HERE = Path(__file__).resolve().parents[1]


def _cache_semantics():
    spec = importlib.util.spec_from_file_location("cs", HERE / "kv" / "test_cache_semantics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0.0, max_value=600.0, allow_nan=False))
def test_codes_decode_at_or_above_the_norm_and_within_one_step(x):
    c = norms.encode_up(torch.tensor([x], dtype=torch.float64))
    y = float(norms.decode(c)[0])
    assert y >= x
    if x >= 2.0 ** -22:
        assert y <= x * 2 ** (1 / 8) * (1 + 1e-12)
    if x == 0:
        assert int(c[0]) == 0 and y == 0


def test_codes_beyond_the_range_are_infinite_and_chains_add():
    big = norms.encode_up(torch.tensor([1e4, float("nan")], dtype=torch.float64))
    assert big.tolist() == [255, 255] and torch.isinf(norms.decode(big)).all()
    c = norms.encode_up(torch.tensor([0.5], dtype=torch.float64))
    ch = norms.chained(c, torch.tensor([0.25], dtype=torch.float64))
    assert float(norms.decode(ch)[0]) >= float(norms.decode(c)[0]) + 0.25


@pytest.mark.parametrize("spec,s,r", [("int8_t16,K.rest=int4_c8", 4, 8), ("int4_t16", 1, 0), ("fp16,rest=int2_c8", 0, 16),
                                      ("int2_t16", 1, 8), ("int4_t16,rest=int2_c8", 4, 16),
                                      ("lm4_t16_h,rest=int2_t16_h", 1, 8), ("int3_t16_h", 4, 0)])
def test_recorded_norms_bound_the_true_errors_at_every_step(spec, s, r):
    """After a prefill and every one-token step, for every layer, head, K|V and position: the decoded code
    >= ||what the cache returns - what was written||, through sink, recent, rest chains and channel groups."""
    cs = _cache_semantics()
    plan = cs.synthetic_plan(uniform=spec, sink=s, recent=r)
    assert plan["rule"]["error_norms"] == "u8log"
    cache = MixedPrecisionCache.from_plan(plan)
    x = cs.X
    n_l = len(plan["layers"])
    tight = []
    for li in range(n_l):
        cache.update(x[:, :, :20], x[:, :, :20], li)
    for i in range(20, 60):
        for li in range(n_l):
            k, v = cache.update(x[:, :, i:i + 1], x[:, :, i:i + 1], li)
            dk, dv = cache.layers[li].error_bounds()
            true = (k.double() - x[:, :, :i + 1].double()).norm(dim=-1)
            assert bool((dk >= true).all()) and bool((dv >= (v.double() - x[:, :, :i + 1].double()).norm(dim=-1)).all())
            assert bool((dk[..., -1] == 0).all())                   # the step's own position is exact
            nz = true > 1e-6
            if nz.any():
                tight.append(float((dk[nz] / true[nz]).max()))
    assert tight and max(tight) < 2.5                           # recorded, not a worst case: within a few steps


def test_norm_bytes_are_counted_and_no_norms_means_no_certificate():
    cs = _cache_semantics()
    with_n = MixedPrecisionCache.from_plan(cs.synthetic_plan(uniform="int4_t16", sink=4, recent=8))
    without = MixedPrecisionCache.from_plan(cs.synthetic_plan(uniform="int4_t16", sink=4, recent=8, error_norms=False))
    for c in (with_n, without):
        for li in range(len(c.layers)):
            c.update(cs.X[:, :, :30], cs.X[:, :, :30], li)
    streams = 2 * len(with_n.layers) * len(with_n.layers[0].rules)
    assert with_n.nbytes() - without.nbytes() == streams * 30 * cs.X.shape[0]
    with pytest.raises(InvalidArgument, match="error norms"):
        without.layers[0].error_bounds()


@pytest.mark.parametrize("padded", [False, True])
def test_real_decoding_stays_inside_the_runtime_bound(tiny_lm_plan, padded):
    """Decode through MixedPrecisionCache under ``certify``: at every step, layer and query head the
    attention output from what the cache returned differs from the output on the exact K/V of the same pass
    by at most the certified run-time bound; the bound itself is computed from the cache's data alone.
    Also for a left-padded batch (a row stored from its own position 0; its pads masked, never stored)."""
    lm, plan = tiny_lm_plan
    cache = MixedPrecisionCache.from_plan(plan, lm.model)
    exact, pairs = {}, []
    for li, layer in enumerate(cache.layers):
        def update(k, v, *a, _orig=layer.update, _li=li, **kw):
            prev = exact.get(_li)
            exact[_li] = (k, v) if prev is None else (torch.cat([prev[0], k], -2), torch.cat([prev[1], v], -2))
            return _orig(k, v, *a, **kw)
        layer.update = update

    def observe(li, query, key, value, bias, tau, bounds):
        g = query.shape[1] // key.shape[1]

        def out(k, v):
            k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
            return torch.softmax(tau * query.double() @ k.transpose(-1, -2) + bias.double(), -1) @ v

        err = (out(key, value) - out(*exact[li])).norm(dim=-1)
        pairs.append((err, bounds))

    ids = torch.randint(1, 256, (2 if padded else 1, 24), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :5], mask[1, :5] = 0, 0                             # row 1: 5 pads
    with torch.no_grad(), certify(lm.model, cache, observer=observe) as cert:
        lm.model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert len(cache.parts) == (2 if padded else 1)
    err = torch.cat([e.flatten() for e, _ in pairs])
    bnd = torch.cat([b.flatten() for _, b in pairs])
    assert int((err > 0).sum()) > 100
    assert bool((bnd >= err).all()), float((err / bnd).max())
    ratio = bnd[err > 0] / err[err > 0]
    print("runtime bound / actual: median", float(ratio.median()), "min", float(ratio.min()))
    assert float(ratio.median()) < 1000                       # informative, not vacuous
    assert len(cert.steps) == 40 and cert.layer_max().shape == (len(cache.layers), len(cache.layers[0].rules))

    # from the cache's own state alone (no reference tensor): stored K/V, decoded norms, a fresh query
    li = 1
    layer = cache.layers[li]
    k_st, v_st = layer.stored()
    layer.exact_tail = 0                                       # a query at the next step reads everything stored
    dk, dv = layer.error_bounds()
    kx, vx = exact[li]
    del exact
    hq = lm.model.config.num_attention_heads
    q = torch.randn(ids.shape[0], hq, 1, k_st.shape[-1], generator=torch.Generator().manual_seed(1)).double() * 4
    bias = torch.zeros(ids.shape[0], 1, 1, k_st.shape[-2])
    if padded:
        bias[1, ..., :5] = torch.finfo(torch.float32).min                # the pads are masked, as the model masks them
    b = runtime_bounds(q, k_st, v_st, bias, 0.25, dk, dv)
    real = (bias[:, 0, 0] == 0)[:, None, :]                         # (B, 1, L): positions that hold tokens
    for rec, st_, ex in ((dk, k_st, kx), (dv, v_st, vx)):           # each recorded norm bounds its own error
        assert bool(((rec >= (st_.double() - ex.double()).norm(dim=-1)) | ~real).all())
    g = hq // k_st.shape[1]

    def att(k, v):
        k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
        return torch.softmax(0.25 * q @ k.transpose(-1, -2) + bias.double(), -1) @ v

    assert bool((b >= (att(k_st, v_st) - att(kx, vx)).norm(dim=-1)).all())


@pytest.fixture(scope="module")
def tiny_lm_plan():
    from hnfverify.analysis.analyzer import AnalysisOptions, analyze
    from hnfverify.models import tiny_model
    from hnfverify.planning import PlanRequest, plan_from_report
    from hnfverify.texts import TokenWindows

    lm = tiny_model("tiny-llama")
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5)).tolist(), 1)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8, fisher_tokens=0))
    summary = {"shape": res.meta["shape"], "rule_grid": res.meta["rule_grid"], "analysis": {**res.meta["options"]},
               "calibration": wins.identity(), "model": {k: str(v) for k, v in lm.identity().items()},
               "arrays": {"sha256": "0" * 64}}
    return lm, plan_from_report(summary, res.arrays, PlanRequest(avg_bits=Fraction(9, 2), sink=4, recent=16))


def test_certify_refuses_a_plan_without_norms(tiny_lm_plan):
    lm, plan = tiny_lm_plan
    p = dict(plan, rule={k: v for k, v in plan["rule"].items() if k != "error_norms"})
    with pytest.raises(InvalidArgument, match="no error norms"):
        with certify(lm.model, MixedPrecisionCache.from_plan(p, lm.model)):
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.integers(1, 6), st.sampled_from(["random", "dominant", "equal"]),
       st.sampled_from([0.0, 1e-9, 1e-3, 0.1, 1.0, 30.0]), st.sampled_from([0.0, 1e-6, 0.1, 1.0]),
       st.integers(0, 2 ** 31), st.booleans())
def test_runtime_bound_holds_on_random_instances(n, d, kind, sk, sv, seed, masked):
    """L5 as implemented: for random q, K, V and stored K~ = K + dK, V~ = V + dV with ||dK_t|| <= dk_t,
    ||dV_t|| <= dv_t (r -> 0, huge r, one dominant position, all-equal scores, masked positions), the
    run-time bound from (q, K~, V~, dk, dv) >= ||o~ - o||."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    q = torch.randn(1, 2, 1, d, generator=g, dtype=torch.float64) * 2
    if kind == "equal":
        k = k[:, :, :1].expand(1, 1, n, d).clone()
    if kind == "dominant":
        k[0, 0, 0] = q[0, 0, 0] * 20
    dk = torch.rand(1, 1, n, generator=g, dtype=torch.float64) * sk
    dv = torch.rand(1, 1, n, generator=g, dtype=torch.float64) * sv
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-300)  # noqa: E731
    ks = k + unit(torch.randn(k.shape, generator=g, dtype=torch.float64)) * (dk * torch.rand(dk.shape, generator=g,
                                                                                           dtype=torch.float64))[..., None]
    vs = v + unit(torch.randn(v.shape, generator=g, dtype=torch.float64)) * (dv * torch.rand(dv.shape, generator=g,
                                                                                           dtype=torch.float64))[..., None]
    bias = torch.zeros(1, 1, 1, n, dtype=torch.float64)
    if masked and n > 1:
        bias[..., : n // 2] = torch.finfo(torch.float32).min          # a sliding window / causal cut
    tau = 0.25
    b = runtime_bounds(q, ks, vs, bias, tau, dk, dv)

    def att(kk, vv):
        kk, vv = kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1)
        return torch.softmax(tau * q @ kk.transpose(-1, -2) + bias, -1) @ vv

    err = (att(ks, vs) - att(k, v)).norm(dim=-1)
    assert bool((b >= err - 1e-12).all()), (b, err)


@pytest.mark.parametrize("spec,s,r", [("int8_t16,K.rest=int4_c8", 4, 8), ("int4_t16", 1, 0), ("fp16,rest=int2_c8", 0, 16),
                                      ("int4_t16,rest=int2_c8", 4, 16)])
def test_evaluation_reads_the_norms_the_cache_records(spec, s, r):
    """One reading of a plan: the teacher-forced evaluation's error-norm bound of every (query, position)
    (``version_norms`` through the selector) equals what the cache's ``error_bounds`` returns for that
    query, after a prefill and every one-token step (empty windows, incomplete channel groups included)."""
    from hnfverify.evaluation.attention import plan_rules, selector, version_norms, versions

    cs = _cache_semantics()
    plan = cs.synthetic_plan(uniform=spec, sink=s, recent=r)
    cache = MixedPrecisionCache.from_plan(plan)
    x, prefix, t_len = cs.X, 20, 60
    n_l = len(plan["layers"])
    rules = plan_rules(plan)
    expect = {}
    for li in range(n_l):
        for h in range(x.shape[1]):
            for kv, rule in zip("KV", rules[(li, h)]):
                xs = x[0, h, :t_len].float()
                vn = version_norms(xs, versions(xs, rule), rule)
                sel = selector(rule, t_len, prefix)
                expect[(li, h, kv)] = vn[sel.long(), torch.arange(t_len)]          # (T, T): row i = query i
    for li in range(n_l):
        cache.update(x[:, :, :prefix], x[:, :, :prefix], li)
    for i in range(prefix, t_len):
        for li in range(n_l):
            cache.update(x[:, :, i:i + 1], x[:, :, i:i + 1], li)
            dk, dv = cache.layers[li].error_bounds()
            for h in range(x.shape[1]):
                for kv, got in zip("KV", (dk, dv)):
                    want = expect[(li, h, kv)][i, :i + 1]
                    assert torch.equal(got[0, h], want), (spec, li, h, kv, i, float((got[0, h] - want).abs().max()))


@pytest.mark.parametrize("fmt", ["fp16", "int8_t16", "int4_t16"])
def test_greedy_certificate_never_certifies_a_token_that_changed(fmt):
    """docs/design.md §2.6 at run time: every token certified "the same greedy token as the full-precision
    cache" is, checked against the full-precision model on the same tokens; the prefill's token (read
    exactly) is certified whenever its margin beats the float allowance."""
    from hnfverify.kv.certify import greedy_certificate
    from hnfverify.models import tiny_model
    from hnfverify.planning import PlanRequest
    from tests.helpers import tiny_plan

    lm = tiny_model("tiny-llama")
    plan = tiny_plan(lm, PlanRequest(uniform=fmt, sink=4, recent=16), suffix_iters=8, suffix_tokens=16)
    assert plan["composition"]["form"] == "suffix"
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(8))
    cache = MixedPrecisionCache.from_plan(plan, lm.model)
    with torch.no_grad(), certify(lm.model, cache, keep_queries=True) as cert:
        res = lm.model.generate(input_ids=ids, cache=cache, max_new_tokens=24, do_sample=False,
                                return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    g = greedy_certificate(cert, plan, list(res.logits), res.sequences[0, 20:].tolist())
    assert g is not None and len(g["certified"]) == 24
    with torch.no_grad():
        ref = lm.model(input_ids=res.sequences[:, :-1], use_cache=False).logits[0, 19:]
    q_top = [int(x[0].argmax()) for x in res.logits]
    for c, a, b in zip(g["certified"], ref.argmax(-1).tolist(), q_top):
        assert not c or a == b
    assert g["z"][0] < 1e-2 * (1 + float(res.logits[0].abs().max()))        # the prefill reads exactly
    assert all(z2 >= z1 for z1, z2 in zip(g["z"], g["z"][1:]))                # errors only accumulate
