"""A plan is tied to the weights it was analyzed on: ``plan.model.weights_sha256`` (every parameter and buffer:
name, dtype, shape, bytes; plus any quantization config), checked with the config hash, the shape and each
layer's tau by ``models.check_plan_matches_model`` in ``evaluate`` and in ``hnfverify generate`` / ``eval``.

failed before the fix: there was no weights fingerprint (``models.weights_sha256`` missing, the plan's model
identity without ``weights_sha256``), so a model with one weight changed by one ulp — same config — was
accepted by ``evaluate``, ``hnfverify generate`` and ``hnfverify eval``; plans with a wrong head_dim,
query_heads or tau were accepted by ``evaluate``.
"""

import copy
import io
from fractions import Fraction

import pytest
import torch

from hnfverify.analysis.analyzer import AnalysisOptions, analyze
from hnfverify.cli import run
from hnfverify.errors import InvalidArgument
from hnfverify.evaluation import evaluate
from hnfverify.models import tiny_model
from hnfverify.planning import PlanRequest, plan_from_report
from hnfverify.analysis.report import load, save
from hnfverify.texts import TokenWindows

T = 64


def _one_ulp_up(model):
    """Change one weight of ``model`` in place by one unit in the last place."""
    w = model.model.layers[2].mlp.down_proj.weight
    with torch.no_grad():
        w[1, 3] = torch.nextafter(w[1, 3], torch.tensor(float("inf")))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny Llama saved as a model directory, its report and an all-FP32 plan covering T positions."""
    tmp = tmp_path_factory.mktemp("identity")
    lm = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(5)
    wins = TokenWindows("random", "file", torch.randint(0, 256, (2, T), generator=g).tolist(), 1)
    res = analyze(lm, wins, AnalysisOptions(lipschitz_iters=2, lipschitz_tokens=8, fisher_tokens=0))
    save(res, lm.identity(), wins.identity(), tmp / "r.json")
    summary, arrays = load(tmp / "r.json")
    plan = plan_from_report(summary, arrays, PlanRequest(uniform="fp32", sink=4, recent=16), "r.json")
    from hnfverify.core.plan import dumps

    (tmp / "plan.json").write_bytes(dumps(plan))
    lm.model.save_pretrained(tmp / "model")
    changed = tiny_model("tiny-llama")
    _one_ulp_up(changed.model)
    changed.model.save_pretrained(tmp / "changed")
    return tmp, plan


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_fingerprint_covers_every_weight_bit_buffers_and_quantization_config():
    from hnfverify.models import weights_sha256

    a, b = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    h = weights_sha256(a.model)
    assert len(h) == 64 and h == weights_sha256(b.model)
    _one_ulp_up(b.model)
    assert weights_sha256(b.model) != h
    c = tiny_model("tiny-llama")
    buf = dict(c.model.named_buffers())["model.rotary_emb.inv_freq"]
    buf[0] = torch.nextafter(buf[0], torch.tensor(float("inf")))           # a (non-persistent) buffer
    assert weights_sha256(c.model) != h
    d = tiny_model("tiny-llama")
    d.model.config.quantization_config = {"quant_method": "example", "bits": 4}
    assert weights_sha256(d.model) != h


def test_the_plan_carries_the_fingerprint_analyze_computed(made):
    from hnfverify.models import weights_sha256

    _, plan = made
    assert plan["model"]["weights_sha256"] == weights_sha256(tiny_model("tiny-llama").model)


def test_evaluate_accepts_the_analyzed_model_and_refuses_one_ulp_off(made):
    _, plan = made
    lm = tiny_model("tiny-llama")
    r = evaluate(lm, plan, "prose", windows=1, prefix=32, scored=32)
    assert r["tokens_scored"] == 32
    _one_ulp_up(lm.model)
    with pytest.raises(InvalidArgument, match=r"model\.weights_sha256.*" + plan["model"]["weights_sha256"]):
        evaluate(lm, plan, "prose", windows=1, prefix=32, scored=32)
    from hnfverify.models import check_plan_matches_model

    check_plan_matches_model(plan, tiny_model("tiny-llama").model)


def test_the_cache_refuses_a_plan_made_for_other_weights(made):
    """MixedPrecisionCache.from_plan(plan, model) checks the fingerprint. Failed before the fix: from_plan took
    only a config (and checked only the layer and head counts)."""
    from hnfverify.kv.cache import MixedPrecisionCache

    _, plan = made
    lm = tiny_model("tiny-llama")
    assert MixedPrecisionCache.from_plan(plan, lm.model).max_seq_len == plan["max_seq_len"]
    _one_ulp_up(lm.model)
    with pytest.raises(InvalidArgument, match=r"model\.weights_sha256"):
        MixedPrecisionCache.from_plan(plan, lm.model)


def test_cli_generate_and_eval_refuse_a_fine_tune_with_the_same_config(made):
    tmp, plan = made
    common = ["--threads", "1"]
    code, out, err = _cli("generate", str(tmp / "plan.json"), "--model", str(tmp / "model"), "--prompt", "hello",
                          "--max-new-tokens", "4", "--raw", *common)
    assert code == 0, err
    code, out, err = _cli("eval", str(tmp / "plan.json"), "--model", str(tmp / "model"), "--text", "prose",
                          "--windows", "1", "--prefix", "32", "--scored", "32", "--quiet", *common)
    assert code == 0, err
    for argv in (["generate", "--prompt", "hello", "--max-new-tokens", "4", "--raw"],
                 ["eval", "--text", "prose", "--windows", "1", "--prefix", "32", "--scored", "32", "--quiet"]):
        code, out, err = _cli(argv[0], str(tmp / "plan.json"), "--model", str(tmp / "changed"), *argv[1:], *common)
        assert code == 2, err
        assert "model.weights_sha256" in err and plan["model"]["weights_sha256"] in err, err
        assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("field, tamper", [
    ("model.weights_sha256", lambda p: p["model"].pop("weights_sha256")),
    ("model.weights_sha256", lambda p: p["model"].update(weights_sha256="0" * 64)),
    ("model.config_sha256", lambda p: p["model"].update(config_sha256="0" * 64)),
    ("shape.head_dim", lambda p: p["shape"].update(head_dim=32)),
    ("shape.query_heads", lambda p: p["shape"].update(query_heads=8)),
    ("shape.kv_heads", lambda p: p["shape"].update(kv_heads=4)),
    ("shape.layers", lambda p: p["shape"].update(layers=3)),
    (r"layers\[2\]\.tau", lambda p: p["layers"][2].update(tau=str(Fraction(p["layers"][2]["tau"]) * 2))),
])
def test_a_plan_that_does_not_describe_the_model_is_refused(made, field, tamper):
    _, plan = made
    lm = tiny_model("tiny-llama")
    bad = copy.deepcopy(plan)
    tamper(bad)
    with pytest.raises(InvalidArgument, match=field):
        evaluate(lm, bad, "prose", windows=1, prefix=32, scored=32)
    from hnfverify.models import check_plan_matches_model

    with pytest.raises(InvalidArgument, match=field):
        check_plan_matches_model(bad, lm.model)
