"""Claims about the real default model (SmolLM2-135M-Instruct). Marked slow; `make test` runs them."""

import numpy as np
import pytest
import torch

from hnfverify.analyzer import AnalysisOptions, analyze
from hnfverify.instrument import instrument
from hnfverify.texts import token_windows
from tests.helpers import independent_qkv, naive_kappa

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hnfverify.models import load_model

    return load_model("smollm2", verbose=False)


def test_smollm2_shape(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads) == (30, 3, 9)


def test_instrumented_logits_equal_plain_logits_on_smollm2(smollm2):
    win = token_windows(smollm2.tokenizer, "prose", max_tokens=96, window=96)
    ids = torch.tensor(win.windows)
    with torch.no_grad():
        plain = smollm2.model(ids).logits
        with instrument(smollm2.model, lambda c: None):
            inst = smollm2.model(ids).logits
    assert torch.equal(plain, inst)


def test_kappa_matches_independent_computation_at_picked_positions(smollm2):
    win = token_windows(smollm2.tokenizer, "code", max_tokens=64, window=64)
    res = analyze(smollm2, win, AnalysisOptions(lipschitz_iters=0))
    a = res.arrays
    assert a["kappa_hi"].shape == (30, 3, 64)
    rng = np.random.default_rng(0)
    picks = [(int(rng.integers(30)), int(rng.integers(3)), int(rng.integers(64))) for _ in range(6)]
    picks.append((29, *np.unravel_index(int(np.argmax(a["kappa_hi"][29])), (3, 64))))
    ids = torch.tensor(win.windows)
    for layer, h, t in picks:
        q, k, v, tau = independent_qkv(smollm2.model, ids, layer)
        ref = naive_kappa(q, k, v, tau, t)[h]
        assert a["kappa_lo"][layer, h, t] <= ref * (1 + 1e-5) + 1e-9, (layer, h, t)
        assert ref <= a["kappa_hi"][layer, h, t] * (1 + 1e-5) + 1e-9, (layer, h, t)


def test_2048_calibration_tokens_fit_in_4_gib(tmp_path):
    """A fresh process analyzing 4 x 512 tokens peaks below 4 GiB resident (model load included)."""
    import subprocess
    import sys

    code = ("import resource, sys\n"
            "from hnfverify.cli import run\n"
            f"rc = run(['analyze', '--max-tokens', '2048', '--window', '512', '--quiet', '--threads', '2', "
            f"'--out', {str(tmp_path / 'r.json')!r}])\n"
            "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rc, peak_kib = (int(x) for x in r.stdout.split()[-2:])
    assert rc == 0
    assert peak_kib < 4 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    import json

    s = json.loads((tmp_path / "r.json").read_text())
    assert s["calibration"]["n_tokens"] == 2048 and s["calibration"]["n_windows"] == 4
