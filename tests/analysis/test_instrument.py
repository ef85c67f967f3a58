import subprocess
import sys

import pytest
import torch

from hnfverify.errors import ModelError
from hnfverify.analysis.instrument import attention_modules, instrument
from hnfverify.models import tiny_model
from tests.helpers import independent_qkv


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_instrumented_logits_equal_plain_logits_exactly(kind, impl):
    lm = tiny_model(kind, attn_implementation=impl)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    calls = []
    with torch.no_grad():
        plain = lm.model(ids).logits
        with instrument(lm.model, calls.append):
            inst = lm.model(ids).logits
        after = lm.model(ids).logits
    assert torch.equal(plain, inst) and torch.equal(plain, after)
    assert sorted(c.layer for c in calls) == list(range(4))
    assert calls[0].query.shape == (2, 4, 33, 16) and calls[0].key.shape == (2, 2, 33, 16)
    assert lm.model.config._attn_implementation == impl


def test_captured_keys_are_post_rope_and_match_independent_projection():
    lm = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    calls = {}
    with torch.no_grad(), instrument(lm.model, lambda c: calls.setdefault(c.layer, c)):
        lm.model(ids, use_cache=False)
    for layer in (0, 3):
        q, k, v, tau = independent_qkv(lm.model, ids, layer)
        torch.testing.assert_close(calls[layer].query[0], q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(calls[layer].key[0], k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(calls[layer].value[0], v, rtol=1e-5, atol=1e-6)
        assert calls[layer].scaling == tau


def test_registries_and_config_restored_after_exception():
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    lm = tiny_model("tiny-llama")
    before = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))

    def boom(call):
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        with torch.no_grad(), instrument(lm.model, boom):
            lm.model(torch.zeros(1, 4, dtype=torch.long))
    assert lm.model.config._attn_implementation == "sdpa"
    assert (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)) == before


def test_model_without_attention_is_rejected():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    net.config = type("C", (), {"_attn_implementation": "sdpa"})()
    with pytest.raises(ModelError, match="no attention layers"):
        with instrument(net, lambda c: None):
            pass
    assert attention_modules(net) == []


def test_importing_hnfverify_imports_no_torch():
    code = ("import sys, hnfverify, hnfverify.cli, hnfverify.texts, hnfverify.errors, hnfverify.io, hnfverify.analysis.report; "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
