"""Measured local Lipschitz estimates of decoder blocks (labelled *measured*, never proved).

For block f and calibration hidden states x (1, T, D), the spectral norm of the Jacobian J_f(x)
(perturbations of the whole sequence, Frobenius norm) is estimated by power iteration on J^T J:
``J^T u`` by reverse mode and ``J v`` by the double-vjp trick (see :func:`jacobian_norm`).
The estimate ||J v_k|| is a lower bound of ||J_f(x)||_2 at that point and of the block's Lipschitz
constant; its relative change over the last iteration is reported so users can judge convergence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LipschitzEstimate:
    value: float          # ||J v|| at the last iterate
    iterations: int
    rel_change: float     # |sigma_k - sigma_{k-1}| / sigma_k


def _block_output(out):
    if isinstance(out, tuple):
        return out[0]
    return out


def jacobian_norm(fn, x, iters: int = 8, seed: int = 0) -> LipschitzEstimate:
    """Power iteration for ||J_fn(x)||_2. fn: tensor -> tensor; x: any shape (float32).

    One forward pass builds the graph; ``J^T u`` is a reverse-mode product, and ``J v`` is the
    reverse-mode derivative of the linear map ``u -> J^T u`` in the direction v (the "double-vjp"
    trick), which reuses the same graph and needs no forward-mode support from the kernels.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = v / v.norm()
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        y = fn(xg)
        u0 = torch.zeros_like(y, requires_grad=True)
        (jtu,) = torch.autograd.grad(y, xg, u0, create_graph=True)       # J^T u0, linear in u0
        sigma_prev, sigma, rel = 0.0, 0.0, float("inf")
        for k in range(iters):
            (jv,) = torch.autograd.grad(jtu, u0, v, retain_graph=True)     # J v
            sigma = float(jv.detach().norm())
            (jtjv,) = torch.autograd.grad(y, xg, jv.detach(), retain_graph=True)
            n = float(jtjv.detach().norm())
            if n == 0.0 or sigma == 0.0:
                return LipschitzEstimate(0.0, k + 1, 0.0)
            v = jtjv.detach() / n
            rel = abs(sigma - sigma_prev) / sigma
            sigma_prev = sigma
    return LipschitzEstimate(sigma, iters, rel)


@contextlib.contextmanager
def capture_block_inputs(model, blocks: dict):
    """Record (args, kwargs) of each block's first call: ``blocks`` maps layer index -> module.

    Inside the block the model runs its *eager* attention (torch's fused SDPA kernels have no
    forward-mode AD), so the captured masks are the explicit ones eager attention needs. Yields a
    dict layer -> (args, kwargs). Hooks and the attention implementation are restored in ``finally``.
    """
    captured: dict = {}
    handles = []
    orig_impl = model.config._attn_implementation

    def make(idx):
        def hook(module, args, kwargs):
            if idx not in captured:
                captured[idx] = (tuple(a.detach() if hasattr(a, "detach") else a for a in args), dict(kwargs))
        return hook

    try:
        model.config._attn_implementation = "eager"
        for idx, mod in blocks.items():
            handles.append(mod.register_forward_pre_hook(make(idx), with_kwargs=True))
        yield captured
    finally:
        for h in handles:
            h.remove()
        model.config._attn_implementation = orig_impl


def block_lipschitz(block, args: tuple, kwargs: dict, iters: int = 8, seed: int = 0) -> LipschitzEstimate:
    """Power iteration for one decoder block at its captured inputs (hidden states first)."""
    import torch

    if args:
        x0, rest = args[0], args[1:]
        kw = dict(kwargs)
    else:
        kw = dict(kwargs)
        x0, rest = kw.pop("hidden_states"), ()
    for k in ("cache", "past_key_values", "past_key_value"):
        if k in kw:
            kw[k] = None
    kw["use_cache"] = False if "use_cache" in kw else kw.get("use_cache", False)

    def fn(x):
        return _block_output(block(x, *rest, **kw))

    config = getattr(block, "config", None) or getattr(getattr(block, "self_attn", None), "config", None)
    orig_impl = config._attn_implementation if config is not None else None
    try:
        if config is not None:
            config._attn_implementation = "eager"
        with torch.enable_grad():
            return jacobian_norm(fn, x0.detach().to(torch.float32), iters=iters, seed=seed)
    finally:
        if config is not None:
            config._attn_implementation = orig_impl
