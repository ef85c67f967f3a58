"""Suffix sensitivities, the remainder constant and the lm_head gain (docs/design.md §2.5, §2.6) on tiny
random models, against a finite-difference Jacobian computed independently in float64."""

import copy

import pytest
import torch

from hnfverify.analysis.routing import routed_attention
from hnfverify.analysis.suffix import injected, lm_head_input, logit_gain, measure
from hnfverify.errors import UnsupportedModel
from hnfverify.models import tiny_model

T = 5


def _ids():
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(3))


def _fd_jacobian(model, ids, layer, h=1e-6):
    """dH / de_layer by central differences in float64: (T D, T D)."""
    m64 = copy.deepcopy(model).double()
    d = m64.config.hidden_size
    box: dict = {}
    cols = []
    with torch.no_grad(), routed_attention(m64, "eager"), injected(m64, box):
        for k in range(T * d):
            e = torch.zeros(1, T, d, dtype=torch.float64)
            e.view(-1)[k] = h
            box[layer] = e
            plus = lm_head_input(m64, ids)
            box[layer] = -e
            minus = lm_head_input(m64, ids)
            cols.append(((plus - minus) / (2 * h)).reshape(-1))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2"])
def test_suffix_sensitivity_matches_the_finite_difference_jacobian(kind):
    lm = tiny_model(kind, num_hidden_layers=3)
    ids = _ids()
    m = measure(lm.model, ids, iters=300, probes=1)
    assert len(m.suffix) == 3 and m.tokens == T
    for layer in (0, 2):
        jac = _fd_jacobian(lm.model, ids, layer)
        true = float(torch.linalg.matrix_norm(jac, ord=2))
        # power iteration converged (a lower estimate in exact arithmetic; the float32 Jacobian differs from the
        # float64 one by ~1e-4 relative)
        assert abs(m.suffix[layer] - true) <= 2e-3 * true, (layer, m.suffix[layer], true)


def test_an_error_at_an_earlier_position_reaches_later_tokens():
    """The Jacobian is over all positions: an error on token 0's attention output moves later tokens' H
    through later layers' keys and values (a per-token Jacobian would miss it)."""
    lm = tiny_model("tiny-llama", num_hidden_layers=3)
    jac = _fd_jacobian(lm.model, _ids(), 0).reshape(T, -1, T, lm.model.config.hidden_size)
    assert float(jac[T - 1, :, 0].abs().max()) > 1e-6
    assert float(jac[0, :, T - 1].abs().max()) == 0.0          # and never backwards (causality)


def test_remainder_bounds_the_probed_second_order_terms():
    lm = tiny_model("tiny-llama", num_hidden_layers=2)
    ids = _ids()
    m = measure(lm.model, ids, iters=8, probes=2)
    assert 0 < m.remainder < float("inf") and m.radius > 0
    # an independent probe at the radius, along a random direction: within (K/2) ||e||^2 up to the
    # spread between directions (the measurement is a max over its own probes, hence an assumption)
    model = lm.model
    box: dict = {}
    g = torch.Generator().manual_seed(99)
    with torch.no_grad(), routed_attention(model, "eager"), injected(model, box):
        base = lm_head_input(model, ids)
        u = torch.randn(2, 1, T, model.config.hidden_size, generator=g)
        u = u / u.norm() * (m.radius / 4)
        box.update({0: u[0], 1: u[1]})
        full = lm_head_input(model, ids)
        box.update({0: u[0] / 1e3, 1: u[1] / 1e3})
        small = lm_head_input(model, ids)
    lin = (small - base) * 1e3                                    # J u, to first order
    r = float((full - base - lin).norm())
    assert r <= 4 * (m.remainder / 2) * float(u.norm()) ** 2


def test_logit_gain_is_twice_the_largest_lm_head_row_norm():
    lm = tiny_model("tiny-llama", num_hidden_layers=2)
    g = logit_gain(lm.model, _ids())
    w = lm.model.get_output_embeddings().weight.detach().double()
    assert g >= 2 * float(w.norm(dim=1).max()) and g <= 2 * float(w.norm(dim=1).max()) * (1 + 1e-9)


def test_logit_gain_refuses_logits_that_are_not_the_lm_head_of_h():
    lm = tiny_model("tiny-llama", num_hidden_layers=2)
    model = lm.model
    orig = model.forward

    def scaled(*a, **kw):
        out = orig(*a, **kw)
        out.logits = out.logits * 2                              # e.g. a logit scale the suffix form does not see
        return out

    model.forward = scaled
    with pytest.raises(UnsupportedModel, match="lm_head"):
        logit_gain(model, _ids())
