"""Measured suffix sensitivities, the remainder constant and the lm_head gain (docs/design.md §2.5, §2.6).

The map F: (e_0, ..., e_{L-1}) -> H sends errors added to each layer's attention-module output (after
its output projection), at every position of a window, to the lm_head input H (the final normed
hidden states, all positions). Later layers see the perturbed keys and values of earlier positions, so
an error reaches later tokens as it does through a real cache.

* ``S_l``: the spectral norm of the Jacobian J_l = dF/de_l at e = 0, by Golub-Kahan-Lanczos bidiagonalization
  (:func:`hnfverify.analysis.lipschitz.jacobian_norm`): a lower estimate, labelled *measured*.
* ``K``: a second-order constant, ||F(e) - F(0) - sum_l J_l e_l|| <= (K/2) ||e||^2 for ||e|| <= rho, probed
  along random directions and along the layers' top singular directions at radii rho, rho/2, rho/4:
  the largest 2 R / s^2 seen. Also *measured*.
* ``Gamma = 2 max_i ||w_i||`` over the lm_head rows: osc(dz_t) <= Gamma ||dH_t||. Computed from the weights
  (float64 norms of float32 rows), after checking that the model's logits are lm_head(H) (a bias cancels).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from ..errors import UnsupportedModel
from .instrument import attention_modules
from .lipschitz import jacobian_norm
from .routing import routed_attention


@dataclass(frozen=True)
class SuffixMeasurement:
    suffix: list             # S_l measured (Lanczos), per layer
    rel_change: list         # relative change of each estimate in its last iteration
    remainder: float         # K measured
    radius: float            # rho: the probes' largest ||e||
    logit_gain: float        # Gamma = 2 max_i ||w_i||
    tokens: int
    iterations: int
    probes: int


@contextlib.contextmanager
def injected(model, box: dict):
    """Add ``box[l]`` (if set) to layer l's attention-module output inside the block."""
    handles = []

    def make(li):
        def hook(module, args, out):
            x = box.get(li)
            if x is None:
                return out
            if isinstance(out, tuple):
                return (out[0] + x,) + tuple(out[1:])
            return out + x
        return hook

    try:
        for _, mod in attention_modules(model):
            handles.append(mod.register_forward_hook(make(int(mod.layer_idx))))
        yield
    finally:
        for h in handles:
            h.remove()


def lm_head_input(model, ids):
    """The final normed hidden states (1, T, D) the lm_head reads."""
    dec = model.get_decoder()
    return dec(input_ids=ids, use_cache=False).last_hidden_state


def logit_gain(model, ids) -> float:
    """Gamma = 2 max_i ||w_i|| of the lm_head rows, after checking logits = lm_head(H) on ``ids``."""
    import torch

    head = model.get_output_embeddings()
    w = getattr(head, "weight", None)
    if w is None or not isinstance(head, torch.nn.Linear):
        raise UnsupportedModel(f"{type(model).__name__}: the output head is not a linear layer; the suffix "
                               "composition needs logits = W H (use --composition product)")
    with torch.no_grad():
        h = lm_head_input(model, ids)
        logits = model(input_ids=ids, use_cache=False).logits
        mine = head(h)
        if mine.shape != logits.shape or float((mine - logits).abs().max()) > 1e-4 * (1 + float(logits.abs().max())):
            raise UnsupportedModel(f"{type(model).__name__}: its logits are not lm_head(final hidden states) (a logit "
                                   "scale or soft-cap?); the suffix composition needs logits = W H + b "
                                   "(use --composition product)")
        rows = w.detach().double().norm(dim=1)
    return 2.0 * float(rows.max()) * (1 + 2.0 ** -40)


def measure(model, ids, iters: int = 6, probes: int = 2, radius_frac: float = 0.25, seed: int = 0,
            progress: bool = False) -> SuffixMeasurement:
    """All three measurements on the token ids ``ids`` (1, T) (eager attention, float32)."""
    import torch

    layers = sorted(int(m.layer_idx) for _, m in attention_modules(model))
    box: dict = {}
    d = model.config.hidden_size
    t = ids.shape[1]
    gain = logit_gain(model, ids)
    with routed_attention(model, "eager"), injected(model, box):
        with torch.no_grad():
            base = lm_head_input(model, ids).float()
        # attention outputs' scale: the radius is a fraction of it (errors beyond it are not first-order)
        outs: dict = {}
        with torch.no_grad(), _captured_outputs(model, outs):
            lm_head_input(model, ids)
        scale = math.sqrt(sum(float(outs[li].double().pow(2).sum()) for li in layers))
        radius = radius_frac * scale
        sfx, rel, tops = [], [], {}
        it = layers
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(layers, desc="suffix sensitivity (Lanczos)", unit="layer", leave=False)
        for li in it:
            def fn(x, li=li):
                box.clear()
                box[li] = x
                return lm_head_input(model, ids)
            est = jacobian_norm(fn, torch.zeros(1, t, d), iters=iters, seed=seed + li, keep_vector=True)
            sfx.append(est.value)
            rel.append(est.rel_change)
            tops[li] = est.vector
        box.clear()
        k = _remainder(model, ids, box, layers, base, tops, radius, probes, seed, t, d)
    box.clear()
    return SuffixMeasurement(sfx, rel, k, radius, gain, t, iters, probes)


@contextlib.contextmanager
def _captured_outputs(model, outs: dict):
    handles = []
    for _, mod in attention_modules(model):
        li = int(mod.layer_idx)
        handles.append(mod.register_forward_hook(
            lambda m, a, out, li=li: outs.__setitem__(li, (out[0] if isinstance(out, tuple) else out).detach())))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _remainder(model, ids, box, layers, base, tops, radius, probes, seed, t, d) -> float:
    """max over probe directions u (||u|| = 1 over all layers) and s in {rho, rho/2, rho/4} of
    2 ||F(s u) - F(0) - s J u|| / s^2, J u by the double-vjp trick on one graph at e = 0."""
    import torch

    n = len(layers)
    gen = torch.Generator().manual_seed(seed + 7919)
    dirs = []
    for _ in range(probes):
        dirs.append(torch.randn(n, 1, t, d, generator=gen))
    dirs.append(torch.stack([tops[li] for li in layers]))            # every layer's top direction at once
    for li in layers[:1] + layers[-1:]:                               # one layer alone: the first and the last
        u = torch.zeros(n, 1, t, d)
        u[layers.index(li)] = tops[li]
        dirs.append(u)
    dirs = [u / u.norm() for u in dirs]
    with torch.enable_grad():
        xs = torch.zeros(n, 1, t, d, requires_grad=True)
        for i, li in enumerate(layers):
            box[li] = xs[i]
        y = lm_head_input(model, ids)
        u0 = torch.zeros_like(y, requires_grad=True)
        (jtu,) = torch.autograd.grad(y, xs, u0, create_graph=True)
        jus = [torch.autograd.grad(jtu, u0, u, retain_graph=True)[0].detach() for u in dirs]
    k = 0.0
    with torch.no_grad():
        for u, ju in zip(dirs, jus):
            for s in (radius, radius / 2, radius / 4):
                for i, li in enumerate(layers):
                    box[li] = s * u[i]
                r = float((lm_head_input(model, ids).float() - base - s * ju).double().norm())
                k = max(k, 2.0 * r / (s * s))
    return k
