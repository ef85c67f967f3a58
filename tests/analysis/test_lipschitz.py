import pytest
import torch

from hnfverify.analysis.lipschitz import block_lipschitz, capture_block_inputs, jacobian_norm
from hnfverify.models import tiny_model


def test_lanczos_finds_spectral_norm_of_linear_map():
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


def _power(a, v, k):
    """k steps of the power iteration on a^T a from v: ||a v_k|| with k products a v (the old estimator)."""
    for _ in range(k - 1):
        v = a.T @ (a @ v)
        v = v / v.norm()
    return float((a @ v).norm())


def test_lanczos_is_at_least_the_power_iteration_after_as_many_products_and_at_most_the_norm():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(30, 24, generator=g, dtype=torch.float64) * torch.rand(24, generator=g, dtype=torch.float64)
        x = torch.randn(24, dtype=torch.float64)
        true = float(torch.linalg.matrix_norm(a, ord=2))
        v0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)   # its start
        for k in (1, 2, 3, 5):
            est = jacobian_norm(lambda y: a @ y, x, iters=k, keep_vector=True)
            assert est.value <= true * (1 + 1e-9)
            assert est.value >= _power(a, v0 / v0.norm(), k) * (1 - 1e-9)
            # the estimate is attained: ||a w|| for the unit vector it reports
            assert abs(float((a @ est.vector).norm()) - est.value) <= 1e-9 * true
            assert abs(float(est.vector.norm()) - 1.0) < 1e-9


def test_rows_bidiagonalize_each_block_of_a_block_diagonal_map():
    g = torch.Generator().manual_seed(3)
    ms = torch.randn(7, 10, 10, generator=g, dtype=torch.float64) * torch.linspace(0.5, 1.5, 7, dtype=torch.float64)[:, None, None]
    x = torch.randn(7, 10, dtype=torch.float64)

    def f(y):
        return torch.einsum("rij,rj->ri", ms, y)

    true = float(torch.linalg.matrix_norm(ms, ord=2).max())
    for k in (2, 3, 4):
        rows = jacobian_norm(f, x, iters=k, rows=True, keep_vector=True)
        whole = jacobian_norm(f, x, iters=k)
        assert whole.value * (1 - 1e-9) <= rows.value <= true * (1 + 1e-9)
        assert abs(float(f(rows.vector).norm()) - rows.value) <= 1e-9 * true
    assert jacobian_norm(f, x, iters=10, rows=True).value == pytest.approx(true, rel=1e-9)


def test_the_rest_of_block_is_bidiagonalized_per_token_only_where_it_maps_tokens_alone():
    from hnfverify.analysis.lipschitz import _tokenwise, rest_of_block

    lm = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(2)
    x, h = (torch.randn(1, 6, lm.model.config.hidden_size, generator=g) for _ in range(2))
    fn = rest_of_block(lm.model.model.layers[0]).at(x)
    with torch.no_grad():
        assert _tokenwise(fn, h, fn(h))

        def mixing(y):                       # a map that mixes tokens: each output sees the tokens before it
            return fn(y) + 1e-3 * y.cumsum(-2)

        assert not _tokenwise(mixing, h, mixing(h))
        fn2 = rest_of_block(lm.model.model.layers[0]).at(x[:, :2])
        assert not _tokenwise(fn2, h[:, :2], fn2(h[:, :2]))    # too few tokens to tell


def test_analysis_restores_threads_and_attention_and_repeats_its_estimates_exactly():
    import numpy as np

    from hnfverify.analysis.analyzer import AnalysisOptions, analyze
    from hnfverify.texts import TokenWindows

    lm = tiny_model("tiny-llama")
    wins = TokenWindows("random", "file", [list(range(3, 19))], 1)
    threads = torch.get_num_threads()
    impl = lm.model.config._attn_implementation
    a = analyze(lm, wins, AnalysisOptions(lipschitz_iters=3, lipschitz_tokens=8, suffix_iters=0))
    b = analyze(lm, wins, AnalysisOptions(lipschitz_iters=3, lipschitz_tokens=8, suffix_iters=0))
    assert torch.get_num_threads() == threads
    assert lm.model.config._attn_implementation == impl
    for f in ("lipschitz", "mlp_lipschitz"):
        assert np.all(np.isfinite(a.arrays[f])) and np.all(a.arrays[f] > 0)
        assert np.array_equal(a.arrays[f], b.arrays[f])
