import torch

from hnfverify.analysis.lipschitz import block_lipschitz, capture_block_inputs, jacobian_norm
from hnfverify.models import tiny_model


def test_power_iteration_finds_spectral_norm_of_linear_map():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    est = jacobian_norm(lambda x: a @ x, torch.randn(6), iters=200)
    assert abs(est.value - float(torch.linalg.matrix_norm(a, ord=2))) < 1e-3 * est.value


def test_block_estimate_is_a_lower_bound_close_to_the_full_jacobian_norm():
    lm = tiny_model("tiny-llama")
    model = lm.model
    blocks = dict(enumerate(model.model.layers))
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_block_inputs(model, blocks) as cap:
        model(ids, use_cache=False)
    assert model.config._attn_implementation == "sdpa"
    args, kwargs = cap[1]
    est = block_lipschitz(blocks[1], args, kwargs, iters=60)
    x0 = args[0] if args else kwargs["hidden_states"]
    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    kw["cache"] = None
    model.config._attn_implementation = "eager"
    try:
        jac = torch.autograd.functional.jacobian(lambda x: blocks[1](x, **kw), x0)
    finally:
        model.config._attn_implementation = "sdpa"
    true = float(torch.linalg.matrix_norm(jac.reshape(x0.numel(), x0.numel()), ord=2))
    assert est.value <= true * (1 + 1e-4)
    assert est.value >= 0.95 * true
