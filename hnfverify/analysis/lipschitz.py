"""Measured local Lipschitz estimates of decoder blocks (labelled *measured*, never proved).

For block f and calibration hidden states x (1, T, D), the spectral norm of the Jacobian J_f(x)
(perturbations of the whole sequence, Frobenius norm) is estimated by power iteration on J^T J:
``J^T u`` by reverse mode and ``J v`` by the double-vjp trick (see :func:`jacobian_norm`).
The estimate ||J v_k|| is a lower bound of ||J_f(x)||_2 at that point and of the block's Lipschitz
constant; its relative change over the last iteration is reported so users can judge convergence.

The rest of block l after its attention (:func:`mlp_lipschitz`): an error injected at the attention output
enters h_mid = x + attn(x) and passes through h_mid -> h_mid + mlp(post_attention_layernorm(h_mid)) before it
reaches block l + 1. Its local estimate L'_l is measured the same way at the calibration h_mid, for
Llama-family decoder layers only; a layer of another structure (sandwich norms, post-norms, parallel
attention and MLP) is refused, and the structure is also checked on the captured tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .routing import routed_attention


@dataclass(frozen=True)
class LipschitzEstimate:
    value: float          # ||J v|| at the last iterate
    iterations: int
    rel_change: float     # |sigma_k - sigma_{k-1}| / sigma_k
    vector: object = None  # with keep_vector: the last unit iterate v (the top right singular direction)


def _block_output(out):
    if isinstance(out, tuple):
        return out[0]
    return out


def jacobian_norm(fn, x, iters: int = 8, seed: int = 0, keep_vector: bool = False) -> LipschitzEstimate:
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
                return LipschitzEstimate(0.0, k + 1, 0.0, v if keep_vector else None)
            v_last = v
            v = jtjv.detach() / n
            rel = abs(sigma - sigma_prev) / sigma
            sigma_prev = sigma
    return LipschitzEstimate(sigma, iters, rel, v_last if keep_vector else None)


@contextlib.contextmanager
def capture_block_inputs(model, blocks: dict):
    """Record (args, kwargs) of each block's first call: ``blocks`` maps layer index -> module.

    Inside the block the model runs its *eager* attention (torch's fused SDPA kernels have no
    forward-mode AD), so the captured masks are the explicit ones eager attention needs. Yields a
    dict layer -> (args, kwargs). Hooks and the attention implementation are restored in ``finally``.
    """
    captured: dict = {}
    handles = []

    def make(idx):
        def hook(module, args, kwargs):
            if idx not in captured:
                captured[idx] = (tuple(a.detach() if hasattr(a, "detach") else a for a in args), dict(kwargs))
        return hook

    with routed_attention(model, "eager"):
        try:
            for idx, mod in blocks.items():
                handles.append(mod.register_forward_pre_hook(make(idx), with_kwargs=True))
            yield captured
        finally:
            for h in handles:
                h.remove()


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

    config = getattr(block, "config", None) or next((m.config for m in block.modules()
                                                     if getattr(m, "config", None) is not None), None)
    eager = routed_attention(None, "eager", config=config) if config is not None else contextlib.nullcontext()
    with eager, torch.enable_grad():
        return jacobian_norm(fn, x0.detach().to(torch.float32), iters=iters, seed=seed)


# --------------------------------------------------------------------------- the rest of the block (its MLP)
_NOT_LLAMA = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_norm", "post_mlp_norm")


def rest_of_block(block):
    """The map h_mid -> h_mid + mlp(post_attention_layernorm(h_mid)) of a Llama-family decoder layer.
    Raises UnsupportedModel, naming the layer's class, where the layer does not have that structure."""
    from ..errors import UnsupportedModel

    cls = type(block).__name__
    ln, mlp = getattr(block, "post_attention_layernorm", None), getattr(block, "mlp", None)
    extra = [n for n in _NOT_LLAMA if getattr(block, n, None) is not None]
    if ln is None or mlp is None or extra or getattr(block, "use_parallel_residual", False):
        have = ", ".join(n for n, _ in block.named_children())
        raise UnsupportedModel(f"decoder layer {cls} is not a Llama-family layer h_mid -> h_mid + "
                               f"mlp(post_attention_layernorm(h_mid)) (it has {have}); the measured Lipschitz "
                               "estimate of the rest of the block (mlp_lipschitz) is defined only for that structure")

    def fn(h):
        return h + mlp(ln(h))

    return fn


@dataclass
class MidPoint:
    """One decoder layer's first call: its input, its attention output, the input of its
    post-attention norm (h_mid) and its output (each (1, T, D))."""
    layer_input: object = None
    attention_output: object = None
    norm_input: object = None
    layer_output: object = None


@contextlib.contextmanager
def capture_mid_states(blocks: dict):
    """Record a :class:`MidPoint` for each block's first call (``blocks``: layer index -> decoder layer).
    Yields a dict layer -> MidPoint; hooks are removed in ``finally``."""
    from .instrument import attention_modules

    points: dict = {}
    handles = []

    def first(idx, what):
        def store(value):
            p = points.setdefault(idx, MidPoint())
            if getattr(p, what) is None and value is not None and hasattr(value, "detach"):
                setattr(p, what, value.detach())
        return store

    try:
        for idx, blk in blocks.items():
            put_x, put_a, put_h, put_y = (first(idx, w) for w in ("layer_input", "attention_output", "norm_input",
                                                                      "layer_output"))
            handles.append(blk.register_forward_pre_hook(
                lambda m, args, kwargs, put=put_x: put(args[0] if args else kwargs.get("hidden_states")),
                with_kwargs=True))
            handles.append(blk.register_forward_hook(lambda m, args, out, put=put_y: put(_block_output(out))))
            attn = attention_modules(blk)
            if attn:
                handles.append(attn[0][1].register_forward_hook(
                    lambda m, args, out, put=put_a: put(_block_output(out))))
            ln = getattr(blk, "post_attention_layernorm", None)
            if ln is not None:
                handles.append(ln.register_forward_pre_hook(lambda m, args, put=put_h: put(args[0] if args else None)))
        yield points
    finally:
        for h in handles:
            h.remove()


def mlp_lipschitz(block, point: MidPoint, iters: int = 8, seed: int = 0) -> LipschitzEstimate:
    """Power iteration for the rest of ``block`` after its attention at the captured h_mid (see the module doc).
    Checks on the captured tensors that h_mid = x + attention output and that the block's output is
    h_mid + mlp(post_attention_layernorm(h_mid)); raises UnsupportedModel otherwise."""
    import torch

    from ..errors import UnsupportedModel

    fn = rest_of_block(block)
    cls = type(block).__name__
    parts = None if point is None else (point.layer_input, point.attention_output, point.norm_input, point.layer_output)
    if parts is None or any(v is None for v in parts):
        raise UnsupportedModel(f"decoder layer {cls}: its attention output and post-attention hidden state were "
                               "not observed during the calibration pass")
    x, a, h, y = (t.to(torch.float32) for t in parts)

    def close(u, v):
        return u.shape == v.shape and float((u - v).abs().max()) <= 1e-5 * (1.0 + float(v.abs().max()))

    with torch.no_grad():
        if not close(x + a, h):
            raise UnsupportedModel(f"decoder layer {cls}: the input of post_attention_layernorm is not the block "
                                   "input plus the attention output (h_mid = x + attn(x)); mlp_lipschitz is defined "
                                   "only for Llama-family layers")
        if not close(fn(h), y):
            raise UnsupportedModel(f"decoder layer {cls}: its output is not h_mid + "
                                   "mlp(post_attention_layernorm(h_mid)); mlp_lipschitz is defined only for "
                                   "Llama-family layers")
    with torch.enable_grad():
        return jacobian_norm(fn, h, iters=iters, seed=seed)
