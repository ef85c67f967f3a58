"""The measured sensitivities (``hnfverify.analysis.sensitivity``) and the planner's fisher objective."""

import json
from fractions import Fraction

import pytest
import torch

from hnfverify.analysis.curvature import WINDOWS
from hnfverify.analysis.sensitivity import REGIONS, _split_by_distance, intervals_of, split_attention
from hnfverify.errors import InvalidArgument
from hnfverify.planning import PlanRequest


@pytest.mark.parametrize("t", [5, 40, 300])
def test_split_by_distance_is_the_masked_product(t):
    g = torch.Generator().manual_seed(t)
    w = torch.tril(torch.randn(3, t, t, generator=g, dtype=torch.float64))
    x = torch.randn(3, t, 7, generator=g, dtype=torch.float64)
    got = _split_by_distance(w, x)
    i, s = torch.arange(t).view(-1, 1), torch.arange(t).view(1, -1)
    for k, r in enumerate(WINDOWS):
        want = (w * ((i - s) >= r)).transpose(-1, -2) @ x
        assert torch.allclose(got[k], want, atol=1e-10), r


class _Module:
    layer_idx = 0
    scaling = None


def test_split_attention_gradients_are_the_far_and_near_reads():
    """The recorded gradient through reads at distance >= R is the derivative of the loss when only those
    reads see a perturbed key (value): a central difference in float64 agrees."""
    t, hq, hkv, d = 24, 4, 2, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, hq, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, hkv, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, hkv, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(1, t, hq, d, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, t, t).masked_fill(torch.ones(t, t).triu(1).bool(), torch.finfo(torch.float32).min)
    grads: dict = {}
    attn = split_attention(grads)
    out, _ = attn(_Module(), q, k.float(), v.float(), mask, scaling=0.5)
    (out.double() * w).sum().backward()
    rec = grads[0]
    tau = 0.5
    dk = torch.randn(hkv, t, d, generator=g, dtype=torch.float64)
    i, s = torch.arange(t).view(-1, 1), torch.arange(t).view(1, -1)

    def loss(r, ek, ev):
        """sum w * attention where reads at distance >= r see K + ek, V + ev."""
        far = ((i - s) >= r).double()
        qq = q.detach()
        kk, vv = k.float().double()[0], v.float().double()[0]
        tot = 0.0
        for h in range(hq):
            kv = h // (hq // hkv)
            sc = tau * (qq[0, h] @ kk[kv].T) + tau * far * (qq[0, h] @ ek[kv].T) + mask[0, 0].double()
            a = torch.softmax(sc, -1)
            o = a @ vv[kv] + (a * far) @ ev[kv]
            tot = tot + (o * w[0, :, h]).sum()
        return tot

    h = 1e-6
    zero = torch.zeros_like(dk)
    for ri, r in enumerate(WINDOWS):
        num_k = (loss(r, h * dk, zero) - loss(r, -h * dk, zero)) / (2 * h)
        num_v = (loss(r, zero, h * dk) - loss(r, zero, -h * dk)) / (2 * h)
        assert float((rec["k"][ri].double() * dk).sum()) == pytest.approx(float(num_k), rel=1e-3, abs=1e-5), r
        assert float((rec["v"][ri].double() * dk).sum()) == pytest.approx(float(num_v), rel=1e-3, abs=1e-5), r


def test_intervals_cover_the_positions_between_the_sink_lengths():
    assert intervals_of(1024) == [[0, 1], [1, 4], [4, 16], [16, 64], [64, None]]
    assert intervals_of(10) == [[0, 1], [1, 4], [4, None]]


@pytest.fixture(scope="module")
def tiny_sensitivity():
    from hnfverify.analysis.sensitivity import measure
    from hnfverify.core.formats import format_table
    from hnfverify.models import tiny_model
    from hnfverify.texts import TokenWindows

    lm = tiny_model("tiny-llama", seed=3)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2)).tolist()
    d = lm.model.config.hidden_size // lm.model.config.num_attention_heads
    table = format_table(d, 16)
    return measure(lm, TokenWindows("random", "file", ids, 1), table, tokens=48), table


def test_costs_are_zero_for_fp32_and_grow_as_a_format_coarsens(tiny_sensitivity):
    sens, table = tiny_sensitivity
    c = sens.cost
    assert (c >= 0).all() and torch.isfinite(torch.from_numpy(c)).all()
    f = sens.formats.index
    assert (c[..., f("fp32"), :] == 0).all()
    rest = REGIONS.index("rest")
    d = next(n for n in table if n.startswith("int8_t"))[len("int8_t"):]
    for coarse, fine in ((f"int2_t{d}", f"int4_t{d}"), (f"int4_t{d}", f"int8_t{d}"), ("int2_c16", "int8_c16")):
        a = c[:, :, :, rest, 0, f(coarse)].sum(-1)
        b = c[:, :, :, rest, 0, f(fine)].sum(-1)
        assert (a > b).all(), (coarse, fine)
    # every lossy format has a price, ordered by its precision: the output-price scaling of the coarse formats
    # once multiplied the finer ones by 0 (FP16, BF16, FP8 and INT8 priced as free; the planner then preferred
    # FP8 to INT8 at 6-8 bits and held KLD 0.008 where uniform INT8 has 0.0004 on SmolLM2)
    price = {n: c[:, :, :, rest, 0, f(n)].sum(-1) for n in sens.formats if n != "fp32"}
    assert all((p > 0).all() for p in price.values()), [n for n, p in price.items() if not (p > 0).all()]
    for coarse, fine in (("fp8_e4m3_t" + d, "fp16"), ("fp8_e5m2_t" + d, "fp8_e4m3_t" + d), ("bf16", "fp16"),
                         (f"int4_t{d}", "fp8_e4m3_t" + d), ("fp8_e4m3_t" + d, f"int8_t{d}")):
        assert (price[coarse] > price[fine]).all(), (coarse, fine)
    # no read is nearer than distance 0: with R = 0 the recent reads carry nothing; with R > 0 they do
    assert (c[:, :, :, REGIONS.index("recent"), 0] == 0).all()
    assert (c[:, :, :, REGIONS.index("recent"), 1, f(f"int2_t{d}")].sum(-1) > 0).all()
    # the sink is read by every query: its price is the whole gradient's, the same for every window
    assert (c[:, :, :, REGIONS.index("sink")] == c[:, :, :, REGIONS.index("sink"), :1]).all()


def test_the_joint_measurement_is_the_model_kl_with_every_unit_of_a_kind_in_the_format(tiny_sensitivity):
    """The joint KL is measured for the coarse formats (the per-token ones and the analysis' channel group, a
    smaller group copying its family's), grows as a format coarsens, and scales the coarse formats' prices."""
    import numpy as np

    from hnfverify.analysis.sensitivity import NONLINEAR_BITS

    sens, table = tiny_sensitivity
    f = sens.formats.index
    d = next(n for n in table if n.startswith("int8_t"))[len("int8_t"):]
    jk = sens.joint_kl
    for n, fmt in table.items():
        coarse = fmt.value_bits <= NONLINEAR_BITS and fmt.family in ("int", "codebook")
        assert np.isfinite(jk[:, f(n)]).all() == coarse, n
        assert (sens.joint[:, f(n)] == 1).all() or coarse, n
    assert (jk[:, f(f"int2_t{d}")] > jk[:, f(f"int4_t{d}")]).all()
    assert (jk[:, f("lm2_c8")] == jk[:, f("lm2_c16")]).all()
    assert (sens.joint[:, f("int3_c8")] == sens.joint[:, f("int3_c16")]).all()
    assert (sens.joint[:, f(f"int2_t{d}")] != 1).all()


def test_fisher_objective_plans_within_budget_and_needs_the_measurement():
    from hnfverify.models import tiny_model
    from tests.helpers import tiny_plan

    lm = tiny_model("tiny-llama", seed=3)
    plans = [tiny_plan(lm, PlanRequest(avg_bits=Fraction(b), sink=4, recent=16), window=64, suffix_iters=0,
                       fisher_tokens=64) for b in (6, 9)]
    for b, p in zip((6, 9), plans):
        assert p["mode"]["budget_split"].startswith("greedy: largest reduction of the measured diagonal-Fisher")
        assert Fraction(p["claims"]["avg_bits"]) <= b
    with pytest.raises(InvalidArgument, match="no measured sensitivities"):
        tiny_plan(lm, PlanRequest(avg_bits=Fraction(6), objective="fisher"), window=64, suffix_iters=0,
                  fisher_tokens=0)
    p = tiny_plan(lm, PlanRequest(avg_bits=Fraction(6)), window=64, suffix_iters=0, fisher_tokens=0)
    assert "first-order Taylor" in p["mode"]["budget_split"]          # linear where nothing was measured


def _rec(t=40, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, t, t).masked_fill(torch.ones(t, t).triu(1).bool(), torch.finfo(torch.float32).min)
    k = torch.randn(hkv, t, d, generator=g)
    k[:, :, 3] *= 20                                   # an outlier channel, as real keys have
    return {"key": k, "value": torch.randn(hkv, t, d, generator=g), "query": torch.randn(hq, t, d, generator=g),
            "bias": mask, "dout": torch.randn(hq, t, d, generator=g), "tau": d ** -0.5}


def test_output_prices_are_zero_for_an_exact_format_and_grow_as_it_coarsens():
    from hnfverify.analysis.sensitivity import _output_prices, _roundtrip_all
    from hnfverify.core.formats import by_name

    rec = _rec()
    def prices(name):
        f = by_name(name)
        return _output_prices(rec, _roundtrip_all(rec["key"], f), _roundtrip_all(rec["value"], f))

    pk, pv, tv = prices("fp32")
    assert pk == [0.0, 0.0] and pv == [0.0, 0.0] and tv == [0.0, 0.0]
    k2, v2, tv2 = prices("int2_t16")
    k8, v8, tv8 = prices("int8_t16")
    assert all(a > b > 0 for a, b in zip(k2, k8)) and all(a > b > 0 for a, b in zip(v2, v8))
    assert all(1 >= a > b > 0 for a, b in zip(tv2, tv8))


def test_fisher_chains_keep_the_cheapest_estimate_per_bits_leave_out_moving_keys_and_keep_the_finest():
    """The fisher objective's chains: among formats of equal bits the lower estimated KL wins (a codebook over the
    uniform grid here), a format is kept only if it is priced below every cheaper one, key formats beyond the
    attention-change limit are left out, and the certified chain's finest format stays last."""
    import numpy as np

    from hnfverify.core.formats import SegmentStats, by_name
    from hnfverify.planning.sensitivity import MAX_KEY_TV, fisher_chains
    from hnfverify.planning.units import Unit

    names = ["int2_t16", "lm2_t16", "int4_t16", "lm4_t16", "int8_t16", "fp16", "fp32"]
    price = {"int2_t16": 0.9, "lm2_t16": 0.5, "int4_t16": 0.3, "lm4_t16": 0.2, "int8_t16": 0.25, "fp16": 0.01,
             "fp32": 0.0}
    fisher = np.zeros((1, 1, 2, 3, 1, len(names), 1))
    for j, n in enumerate(names):
        fisher[0, 0, :, 2, 0, j, 0] = price[n]
    tv = np.zeros((1, 1, len(names)))
    tv[0, 0, names.index("lm2_t16")] = MAX_KEY_TV + 0.01
    summary = {"analysis": {"fisher": {"formats": names, "windows": [16], "intervals": [[4, None]], "tokens": 64}}}
    table = {n: by_name(n) for n in names}
    rechain = fisher_chains(summary, {"fisher": fisher, "fisher_key_tv": tv}, table, eps_bound=False)
    stats = SegmentStats(16, Fraction(1), Fraction(1), Fraction(1))
    for kv, want in (("V", ["lm2_t16", "lm4_t16", "fp16", "fp32"]), ("K", ["int2_t16", "lm4_t16", "fp16", "fp32"])):
        u = Unit(0, 0, kv, "rest", 44, stats, (Fraction(0), Fraction(0)), {}, chain=[by_name("fp32")], sink=4,
                 recent=16, max_seq_len=64)
        rechain(u, Fraction(1))
        assert [f.name for f in u.chain] == want, kv
    tv[:] = 1.0                                        # every key format moves the attention: the finest stays
    u = Unit(0, 0, "K", "rest", 44, stats, (Fraction(0), Fraction(0)), {}, chain=[by_name("fp32")], sink=4,
             recent=16, max_seq_len=64)
    rechain(u, Fraction(1))
    assert [f.name for f in u.chain] == ["fp32"]
    # a format priced like the finest (the estimate cannot tell int8 from fp32) stays in the chain: without it
    # the next step after 4 bits would be 32 bits
    tv[:] = 0.0
    fisher[0, 0, :, 2, 0, names.index("int8_t16"), 0] = 0.0
    fisher[0, 0, :, 2, 0, names.index("fp16"), 0] = 0.0
    u = Unit(0, 0, "V", "rest", 44, stats, (Fraction(0), Fraction(0)), {}, chain=[by_name("fp32")], sink=4,
             recent=16, max_seq_len=64)
    rechain(u, Fraction(1))
    assert [f.name for f in u.chain] == ["lm2_t16", "lm4_t16", "int8_t16", "fp32"]
    # a format that breaks the model when every unit of its kind uses it is out of that kind's chains
    from hnfverify.planning.sensitivity import MAX_JOINT_KL

    jk = np.full((2, len(names)), np.nan)
    jk[1, names.index("lm4_t16")] = MAX_JOINT_KL * 1.01
    jk[0, names.index("lm4_t16")] = MAX_JOINT_KL
    rechain = fisher_chains(summary, {"fisher": fisher, "fisher_key_tv": tv, "fisher_joint_kl": jk}, table, False)
    for kv, want in (("V", ["lm2_t16", "int4_t16", "int8_t16", "fp32"]),
                     ("K", ["lm2_t16", "lm4_t16", "int8_t16", "fp32"])):
        u = Unit(0, 0, kv, "rest", 44, stats, (Fraction(0), Fraction(0)), {}, chain=[by_name("fp32")], sink=4,
                 recent=16, max_seq_len=64)
        rechain(u, Fraction(1))
        assert [f.name for f in u.chain] == want, kv


def test_a_fisher_plan_uses_no_key_format_beyond_the_attention_change_limit():
    from hnfverify.models import tiny_model
    from hnfverify.planning import plan_from_report
    from hnfverify.planning.sensitivity import MAX_KEY_TV
    from tests.helpers import tiny_report

    summary, arrays = tiny_report(tiny_model("tiny-llama", seed=3), window=64, suffix_iters=0, fisher_tokens=64)
    names = summary["analysis"]["fisher"]["formats"]
    tv = arrays["fisher_key_tv"]
    assert (tv >= 0).all() and (tv <= 1).all() and (tv > 0).any()
    plan = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(6), sink=4, recent=16))
    for la in plan["layers"]:
        for h in la["heads"]:
            for seg, st in h["K"].items():
                if isinstance(st, dict) and "format" in st and st["format"] in names:
                    assert tv[la["layer"], h["kv_head"], names.index(st["format"])] <= MAX_KEY_TV


def test_no_codebooks_plans_from_the_uniform_grids_only_and_still_checks():
    from hnfverify.cli.parser import build_parser
    from hnfverify.cli.plan_commands import plan_request
    from hnfverify.core.formats import by_name
    from hnfverify.core.verify.obligations import check_plan
    from hnfverify.models import tiny_model
    from hnfverify.planning import plan_from_report
    from tests.helpers import tiny_report

    summary, arrays = tiny_report(tiny_model("tiny-llama", seed=3), window=64, suffix_iters=0, fisher_tokens=64)
    assert any(by_name(n).family == "codebook" for n in summary["analysis"]["fisher"]["formats"])
    args = build_parser().parse_args(["plan", "r.json", "--avg-bits", "3", "--no-codebooks"])
    req = plan_request(args)
    assert req.codebooks is False and PlanRequest(avg_bits=Fraction(3)).codebooks is True
    for codebooks in (True, False):
        req = PlanRequest(avg_bits=Fraction(6), sink=4, recent=16, codebooks=codebooks)
        plan = plan_from_report(summary, arrays, req)
        used = {st["format"] for la in plan["layers"] for h in la["heads"] for kv in "KV"
                for st in h[kv].values() if isinstance(st, dict) and "format" in st}
        assert any(by_name(n).family == "codebook" for n in used) == codebooks, used
        assert Fraction(plan["claims"]["avg_bits"]) <= 6
        assert check_plan(plan).verdict() == "PROVED"


def test_channel_group_all_lets_each_unit_pick_its_group_and_still_checks():
    from hnfverify.cli.parser import build_parser
    from hnfverify.cli.plan_commands import plan_request
    from hnfverify.core.formats import by_name, channel_groups_of
    from hnfverify.core.verify.obligations import check_plan
    from hnfverify.errors import InvalidArgument
    from hnfverify.models import tiny_model
    from hnfverify.planning import plan_from_report
    from tests.helpers import tiny_report

    summary, arrays = tiny_report(tiny_model("tiny-llama", seed=3), window=64, suffix_iters=0, fisher_tokens=64,
                                  channel_group=32)
    assert plan_request(build_parser().parse_args(["plan", "r.json", "--avg-bits", "6", "--channel-group", "all"])
                        ).channel_group == "all"
    with pytest.raises(InvalidArgument, match="integer or all"):
        build_parser().parse_args(["plan", "r.json", "--avg-bits", "6", "--channel-group", "every"])
    with pytest.raises(InvalidArgument, match="integer or all"):
        PlanRequest(avg_bits=Fraction(6), channel_group="every").validate()
    used = {}
    for group in (None, "all"):
        plan = plan_from_report(summary, arrays, PlanRequest(avg_bits=Fraction(5), sink=4, recent=16,
                                                             channel_group=group))
        assert Fraction(plan["claims"]["avg_bits"]) <= 5
        assert check_plan(plan).verdict() == "PROVED"
        used[group] = {by.group for by in (by_name(st["format"]) for la in plan["layers"] for h in la["heads"]
                       for kv in "KV" for st in h[kv].values() if isinstance(st, dict) and "format" in st)
                       if by.granularity == "channel"}
    assert used[None] == {32} and used["all"] <= set(channel_groups_of(32)) and used["all"] - {32}, used


def test_recent_auto_takes_the_window_with_the_lowest_estimate():
    from hnfverify.errors import PlanInfeasible
    from hnfverify.models import tiny_model
    from hnfverify.planning.planner import plan_with_estimate
    from tests.helpers import tiny_report

    summary, arrays = tiny_report(tiny_model("tiny-llama", seed=4), window=160, seed=6, suffix_iters=0,
                                  fisher_tokens=160)
    est = {}
    for r in summary["rule_grid"]["windows"]:
        try:
            est[r] = plan_with_estimate(summary, arrays, PlanRequest(avg_bits=Fraction(7), recent=r))[1]
        except PlanInfeasible:
            pass
    assert len(est) >= 2 and len(set(est.values())) >= 2
    plan, e = plan_with_estimate(summary, arrays, PlanRequest(avg_bits=Fraction(7), recent=None))
    assert plan["rule"]["recent"] == min(est, key=est.get) and e == min(est.values())
    assert "the lowest estimated KL per token" in plan["mode"]["budget_split"]
    with pytest.raises(InvalidArgument, match="--recent auto"):
        plan_with_estimate(summary, arrays, PlanRequest(eps=Fraction(1), recent=None))


def test_cli_plans_with_the_measured_sensitivities_and_refuses_auto_without_them(tmp_path):
    import io

    from hnfverify.cli import run

    def cli(argv):
        out, err = io.StringIO(), io.StringIO()
        return run(argv, out, err), out.getvalue(), err.getvalue()

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 60)
    for name, extra in (("rep.json", []), ("bare.json", ["--fisher-tokens", "0"])):
        code, _, err = cli(["analyze", "--model", "tiny-llama", "--calib", str(text), "--max-tokens", "256",
                            "--window", "128", "--out", str(tmp_path / name), "--quiet", "--threads", "1", *extra])
        assert code == 0, err
    code, out, err = cli(["plan", str(tmp_path / "rep.json"), "--avg-bits", "7", "--recent", "auto",
                          "--out", str(tmp_path / "p.json")])
    assert code == 0, err
    assert "estimate     KL per token ~" in out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert "the lowest estimated KL per token" in plan["mode"]["budget_split"]
    code, out, err = cli(["plan", str(tmp_path / "bare.json"), "--avg-bits", "7", "--recent", "auto",
                          "--out", str(tmp_path / "q.json")])
    assert code == 2 and "--recent auto" in err and "Traceback" not in err
    assert not (tmp_path / "q.json").exists()
    code, out, err = cli(["plan", str(tmp_path / "bare.json"), "--avg-bits", "7", "--objective", "fisher",
                          "--out", str(tmp_path / "q.json")])
    assert code == 2 and "no measured sensitivities" in err
