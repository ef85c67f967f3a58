"""Measured local Lipschitz estimates of decoder blocks (labelled *measured*, never proved).

For block f and calibration hidden states x (1, T, D), the spectral norm of the Jacobian J_f(x)
(perturbations of the whole sequence, Frobenius norm) is estimated by Golub-Kahan-Lanczos bidiagonalization
(a Krylov method on J^T J, :func:`jacobian_norm`): ``J^T u`` by reverse mode and ``J v`` by the double-vjp trick (see :func:`jacobian_norm`).
The estimate is a lower bound of ||J_f(x)||_2 at that point and of the block's Lipschitz constant; its
relative change over the last step is reported so users can judge convergence.

The rest of block l after its attention (:func:`mlp_lipschitz`): an error injected at the attention module's
output a reaches block l + 1 through the map R_x: a -> block output, the block input x fixed
(:func:`rest_of_block`, docs/design.md §2.5a). Its local estimate L'_l is measured the same way at the
calibration a. Four layer structures are known, each identified by the layer's modules and then checked on
the captured tensors (the block's real output must equal R_x(a)); any other is refused:

* sequential (Llama family): h = x + a, y = h + mlp(post_attention_layernorm(h));
* parallel (GPT-NeoX with use_parallel_residual; Phi and Cohere, whose MLP reads the attention's own
  input_layernorm): y = x + a + mlp(norm(x)), so R_x is a translation and L'_l = 1 exactly;
* post-norm (OLMo-2): h = x + post_attention_layernorm(a), y = h + post_feedforward_layernorm(mlp(h));
* sandwich (Gemma 2/3): h = x + post_attention_layernorm(a),
  y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))).

R_x acts on each token alone (checked on the captured point), so its Jacobian is block diagonal over tokens
and each token gets its own bidiagonalization (``jacobian_norm(rows=True)``).
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


def jacobian_norm(fn, x, iters: int = 8, seed: int = 0, keep_vector: bool = False,
                  rows: bool = False) -> LipschitzEstimate:
    """A lower estimate of ||J_fn(x)||_2 by ``iters`` steps of Golub-Kahan-Lanczos bidiagonalization.
    fn: tensor -> tensor; x: any shape (float32).

    From a random unit v_1, step j forms u_j ~ J v_j - beta_(j-1) u_(j-1) and v_(j+1) ~ J^T u_j - alpha_j v_j,
    each re-orthogonalized against all earlier ones, so that J V_k = U_k B_k with B_k upper bidiagonal
    (alpha on the diagonal, beta above). The estimate is sigma_max(B_k) = ||J w|| for the unit w = V_k y
    (y the top right singular vector of B_k): a lower bound of ||J||_2, and at least the power iteration's
    ||J v|| after the same k products J v (its iterate lies in the same Krylov space) — on SmolLM2's blocks
    4 steps reach what 6 power iterations did. ``J v`` is the reverse-mode derivative of the linear map
    ``u -> J^T u`` in the direction v (the "double-vjp" trick); it reuses one graph and needs no forward-mode
    support from the kernels. k steps cost k products J v and k - 1 products J^T u.

    rows=True: J is block diagonal over every index but the last (each row x[..., :] is mapped on its own,
    as by a per-token MLP); each row gets its own bidiagonalization, all in the same products, and the
    estimate is the largest row's — at least the whole-vector estimate after the same steps, since every
    row's Krylov space contains that row of the whole-vector one. ``vector`` (keep_vector) is w, unit norm.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)

    def dot(a, b):
        return (a * b).sum(-1, keepdim=True) if rows else (a * b).sum()

    def unit(p):
        n = dot(p, p).sqrt()
        return torch.where(n > 0, p / torch.where(n > 0, n, 1.0), 0.0), n

    v, _ = unit(v)
    vs, us, alphas, betas = [v], [], [], []
    sigma, sigma_prev, rel, y = 0.0, 0.0, float("inf"), None
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = fn(xg)
        u0 = torch.zeros_like(out, requires_grad=True)
        (jtu,) = torch.autograd.grad(out, xg, u0, create_graph=True)       # J^T u0, linear in u0
        for k in range(iters):
            (p,) = torch.autograd.grad(jtu, u0, vs[-1], retain_graph=True)    # J v_k
            p = p.detach()
            if us:
                p = p - betas[-1] * us[-1]
            for q in us:                                                       # full re-orthogonalization
                p = p - dot(q, p) * q
            u, a = unit(p)
            us.append(u)
            alphas.append(a)
            sigma, y = _bidiagonal_top(alphas, betas)
            rel = abs(sigma - sigma_prev) / sigma if sigma > 0 else 0.0
            sigma_prev = sigma
            if sigma == 0.0 or k == iters - 1:
                break
            (r,) = torch.autograd.grad(out, xg, u, retain_graph=True)          # J^T u_k
            r = r.detach() - a * vs[-1]
            for q in vs:
                r = r - dot(q, r) * q
            v, b = unit(r)
            vs.append(v)
            betas.append(b)
    vector = None
    if keep_vector and y is not None:
        top, coef = y
        w = sum(coef[..., i:i + 1].to(x.dtype) * vs[i] for i in range(len(alphas)))   # every row's Ritz vector
        if rows:                                                                    # the largest row's alone
            keep = torch.zeros(w.shape[:-1] + (1,), dtype=x.dtype).reshape(-1)
            keep[top] = 1.0
            w = w * keep.reshape(w.shape[:-1] + (1,))
        vector = w / max(float(w.norm()), 1e-300)
    return LipschitzEstimate(sigma, len(alphas), rel, vector)


def _bidiagonal_top(alphas: list, betas: list):
    """sigma_max of the upper bidiagonal B (alphas on the diagonal, betas above; each a scalar tensor, or a
    (..., 1) tensor per row), the largest over rows; and (the flat index of that row, every row's top right
    singular vector of its B as a tensor (..., k) shaped like the rows, float64)."""
    import torch

    k = len(alphas)
    shape = tuple(alphas[0].shape[:-1]) if alphas[0].dim() else ()
    a = torch.stack([x.detach().double().reshape(-1) for x in alphas], -1)      # (R, k)
    bmat = torch.diag_embed(a)
    if k > 1:
        bmat = bmat + torch.diag_embed(torch.stack([x.detach().double().reshape(-1) for x in betas[:k - 1]], -1),
                                       offset=1)
    _, s, vh = torch.linalg.svd(bmat)                                            # (R, k), (R, k, k)
    top = int(s[:, 0].argmax())
    return float(s[top, 0]), (top, vh[:, 0, :].reshape(*shape, k))


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


def eager_view(module):
    """A shallow copy of ``module`` whose submodules see a copy of their config with the eager attention
    implementation: the same parameters and buffers, no change to the model or its shared config, so it may
    run while other threads run the model with another attention implementation."""
    import copy

    view = copy.copy(module)
    view._modules = {n: (None if m is None else eager_view(m)) for n, m in module._modules.items()}
    cfg = view.__dict__.get("config")
    if cfg is not None and hasattr(cfg, "_attn_implementation"):
        cfg = copy.copy(cfg)
        cfg._attn_implementation = "eager"
        view.config = cfg
    return view


def block_lipschitz(block, args: tuple, kwargs: dict, iters: int = 8, seed: int = 0) -> LipschitzEstimate:
    """The estimate for one decoder block at its captured inputs (hidden states first), the block running
    its eager attention (:func:`eager_view`; torch's fused SDPA kernels have no double backward)."""
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

    view = eager_view(block)

    def fn(x):
        return _block_output(view(x, *rest, **kw))

    with torch.enable_grad():
        return jacobian_norm(fn, x0.detach().to(torch.float32), iters=iters, seed=seed)


# --------------------------------------------------------------------------- the rest of the block (its MLP)
_REFUSED = ("post_attention_norm", "post_mlp_norm")


@dataclass(frozen=True)
class RestOfBlock:
    """The structure of a decoder layer after its attention (module doc): ``kind`` is one of "sequential",
    "parallel", "post-norm", "sandwich"; ``at(x)`` is R_x: attention output a -> block output (tensors
    (..., T, D)); ``norm_is_mid``: whether post_attention_layernorm's input is h = x + a (sequential only)."""
    kind: str
    build: object

    def at(self, x):
        return self.build(x)

    @property
    def norm_is_mid(self) -> bool:
        return self.kind == "sequential"


def rest_of_block(block) -> RestOfBlock:
    """The :class:`RestOfBlock` of a decoder layer. Raises UnsupportedModel, naming the layer's class, where
    the layer has none of the four structures of the module doc."""
    from ..errors import UnsupportedModel

    cls = type(block).__name__
    mlp = getattr(block, "mlp", None)
    post_attn, post_ff, pre_ff = (getattr(block, n, None) for n in
                                  ("post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm"))
    refused = [n for n in _REFUSED if getattr(block, n, None) is not None]
    parallel = bool(getattr(block, "use_parallel_residual", False))
    kind, mlp_norm = None, post_attn
    if mlp is not None and post_attn is None and pre_ff is None and post_ff is None and not refused \
            and getattr(block, "input_layernorm", None) is not None:
        kind, mlp_norm = "parallel", block.input_layernorm      # Phi, Cohere: attention and MLP on one norm
    elif mlp is not None and post_attn is not None and not refused:
        if parallel and post_ff is None and pre_ff is None:
            kind = "parallel"
        elif not parallel and post_ff is None and pre_ff is None:
            kind = "sequential"
        elif not parallel and post_ff is not None and pre_ff is None:
            kind = "post-norm"
        elif not parallel and post_ff is not None and pre_ff is not None:
            kind = "sandwich"
    if kind is None:
        have = ", ".join(n for n, _ in block.named_children())
        raise UnsupportedModel(f"decoder layer {cls} has none of the known structures after its attention "
                               f"(sequential, parallel, post-norm, sandwich; it has {have}{', parallel residual' if parallel else ''}): "
                               "the measured Lipschitz estimate of the rest of the block (mlp_lipschitz) is defined "
                               "only for those")

    def build(x):
        if kind == "sequential":
            def fn(a):
                h = x + a
                return h + mlp(post_attn(h))
        elif kind == "parallel":
            c = x + mlp(mlp_norm(x))                  # the MLP reads the block input: the error passes unchanged

            def fn(a):
                return c + a
        elif kind == "post-norm":
            def fn(a):
                h = x + post_attn(a)
                return h + post_ff(mlp(h))
        else:
            def fn(a):
                h = x + post_attn(a)
                return h + post_ff(mlp(pre_ff(h)))
        return fn

    return RestOfBlock(kind, build)


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
    """Lanczos estimate of ||J R_x|| for the rest of ``block`` after its attention (:func:`rest_of_block`) at the
    captured attention output, the block input x fixed (see the module doc). Checks on the captured tensors
    that the block's output is R_x(a) (and, for the sequential structure, that post_attention_layernorm reads
    x + a); raises UnsupportedModel otherwise."""
    import torch

    from ..errors import UnsupportedModel

    rest = rest_of_block(block)
    cls = type(block).__name__
    parts = None if point is None else (point.layer_input, point.attention_output, point.layer_output)
    if parts is None or any(v is None for v in parts) or (rest.norm_is_mid and point.norm_input is None):
        raise UnsupportedModel(f"decoder layer {cls}: its input, attention output and output (and, sequential, "
                               "post_attention_layernorm's input) were not observed during the calibration pass")
    x, a, y = (t.to(torch.float32) for t in parts)
    h = point.norm_input.to(torch.float32) if rest.norm_is_mid else None

    def close(u, v):
        return u.shape == v.shape and float((u - v).abs().max()) <= 1e-5 * (1.0 + float(v.abs().max()))

    fn = rest.at(x)
    with torch.no_grad():
        if rest.norm_is_mid and not close(x + a, h):
            raise UnsupportedModel(f"decoder layer {cls}: the input of post_attention_layernorm is not the block "
                                   "input plus the attention output (h = x + attn(x)), as the sequential structure "
                                   "has it")
        base = fn(a)
        if not close(base, y):
            raise UnsupportedModel(f"decoder layer {cls}: its output is not what the {rest.kind} structure computes "
                                   "from its input and its attention output; mlp_lipschitz is defined only for the "
                                   "structures it identifies")
    with torch.enable_grad():
        return jacobian_norm(fn, a, iters=iters, seed=seed, rows=_tokenwise(fn, a, base))


def _tokenwise(fn, h, base) -> bool:
    """Whether fn maps each token (h[..., t, :]) on its own, as a Llama-family MLP with its RMSNorm does, so
    that its Jacobian is block diagonal over tokens: a large change of the first and the last token must
    leave every token between them unchanged (to 1e-6 of the output's scale). base = fn(h)."""
    import torch

    if h.shape[-2] < 3:
        return False
    with torch.no_grad():
        hp = h.clone()
        hp[..., 0, :] = hp[..., 0, :] * 3.0 + 1.0
        hp[..., -1, :] = hp[..., -1, :] * -2.0 + 0.5
        diff = (fn(hp) - base)[..., 1:-1, :].abs()
        return float(diff.max()) <= 1e-6 * (1.0 + float(base.abs().max()))
