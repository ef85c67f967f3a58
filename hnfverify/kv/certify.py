"""Run-time certification (docs/design.md §2.4b): the attention error a plan cache makes at each step,
bounded from what the cache stores alone — the stored K~, V~ it returns, the recorded error norms
(``hnfverify.kv.norms``) and the step's real queries.

For one query q over the visible positions t, with dk_t >= ||K~_t - K_t||, dv_t >= ||V~_t - V_t||,
alpha~ = softmax(tau q.K~ + mask), o~ = sum alpha~_t V~_t, m_t = tau ||q|| dk_t >= |delta_t| and
r = 2 max_t m_t (Lemma L4), w_t = ||V~_t - o~|| + dv_t (>= ||V_t - o~||), L = sum alpha~_t e^-m_t,
U = sum alpha~_t e^m_t and g_t = max(e^m_t / L - 1, 1 - e^-m_t / U), the exact attention o over the
true K, V satisfies (Lemma L5 (b), with L2 and L3')

    ||o~ - o|| <= sum_t alpha~_t dv_t + min(sum_t alpha~_t g_t w_t,  2 tanh(r/4) max_t w_t).

Each position pays for its own key error: a large error on positions the query hardly attends to
costs little.

Everything is computed in float64 from the float32 stored values: alpha~, o~ and the distances to the
float64 o~ (any centre is allowed, so o~'s own rounding costs nothing), ||V~_t - o~||^2 expanded with a
rounding margin, and a final relative margin of 1e-9 for the float64 sums. The bound is that of exact
attention over the stored data; the model's float32 kernel rounds both runs alike and is not counted.

    with certify(model, cache) as cert:
        model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cert.layer_max()        # (layers, KV heads): the largest certified ||o~ - o|| of any step
"""

from __future__ import annotations

import contextlib
import sys

import torch

from ..errors import InvalidArgument

SUM_MARGIN = 1e-9
_EPS64 = 2.0 ** -53


def bound_from_parts(alpha, dist, dk, dv, qn, tau: float, vis):
    """The bound of L5 (b) (with L2, L3', L4) per query. alpha, dist (upper bounds of ||V~_t - c||), vis:
    (..., n, L); dk, dv: (..., n, L) or broadcastable; qn: (..., n) query norms. All float64 (vis bool).
    Returns (..., n)."""
    zero = torch.zeros((), dtype=torch.float64)
    m = torch.where(vis, tau * qn.unsqueeze(-1) * dk, zero)           # m_t >= |delta_t| (L4)
    r = 2.0 * m.amax(-1)
    first = torch.where(vis, alpha * dv, zero).sum(-1)        # masked positions (alpha 0) cost nothing
    w = torch.where(vis, dist + dv, zero)
    # L5: alpha_t / alpha~_t in [e^-m_t / U, e^m_t / L], L, U from alpha~ (rounded outward)
    lo = (alpha * torch.exp(-m)).sum(-1, keepdim=True) * (1 - SUM_MARGIN)
    hi = (alpha * torch.exp(m)).sum(-1, keepdim=True) * (1 + SUM_MARGIN)
    g = torch.maximum(torch.exp(m) / lo - 1, 1 - torch.exp(-m) / hi).clamp(min=0.0)
    per_pos = (alpha * g * w).sum(-1)
    tv = 2.0 * torch.tanh(r / 4) * w.amax(-1)
    # an infinite recorded norm (code 255) makes the bound infinite; 0 * inf terms are nan: inf
    out = (first + torch.minimum(per_pos, tv)) * (1 + SUM_MARGIN)
    return torch.nan_to_num(out, nan=float("inf"))


def distances_up(v: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Upper bounds of ||v_t - o_i||: v (..., L, d), o (..., n, d) float64 -> (..., n, L). Expanded as
    ||v||^2 - 2 o.v + ||o||^2 with a margin covering float64 rounding of the three dot products."""
    d = v.shape[-1]
    vn2 = (v * v).sum(-1)
    on2 = (o * o).sum(-1)
    sq = vn2.unsqueeze(-2) - 2.0 * (o @ v.transpose(-1, -2)) + on2.unsqueeze(-1)
    margin = 4.0 * (d + 2) * _EPS64 * (vn2.unsqueeze(-2) + on2.unsqueeze(-1))
    return torch.sqrt(torch.clamp(sq, min=0.0) + margin)


def runtime_bounds(query, key, value, bias, tau: float, dk, dv):
    """query (B, Hq, n, d); key, value (B, Hkv, L, d) as the cache returned them; bias (B|1, Hq|1, n, L) the
    model's additive mask; dk, dv (B, Hkv, L) recorded error bounds. Returns (B, Hq, n) float64 bounds."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    if not bool((dk > 0).any() or (dv > 0).any()):
        return torch.zeros(b, hq, n, dtype=torch.float64)
    q = query.double()
    k = key.double().repeat_interleave(g, dim=1)
    v = value.double().repeat_interleave(g, dim=1)
    bias = bias.double()
    vis = (bias > torch.finfo(torch.float32).min / 2).expand(b, hq, n, k.shape[-2])
    scores = tau * (q @ k.transpose(-1, -2)) + bias
    alpha = torch.softmax(scores, dim=-1)
    o = alpha @ v
    dist = distances_up(v, o)
    dke = dk.repeat_interleave(g, dim=1).unsqueeze(-2)
    dve = dv.repeat_interleave(g, dim=1).unsqueeze(-2)
    return bound_from_parts(alpha, dist, dke, dve, q.norm(dim=-1), tau, vis)


def _original_attention(name: str, module):
    """The attention function the model would call (its configured implementation, or its eager one)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise InvalidArgument(f"{type(module).__name__}: no eager attention function to certify around")
    return fn


class Certifier:
    """Per-step certified attention-error bounds of a :class:`MixedPrecisionCache` (docs/design.md §2.4b).

    ``steps``: one (layers, KV heads) float64 tensor per forward pass (max over the batch, the pass's
    queries and each KV head's query heads); ``queries`` (with ``keep_queries``): per forward pass a dict
    layer -> (B, Hq, n) bounds; ``monitor``: queries with ||q|| above the plan's q_max (plus the cache's own
    counts of stored vectors beyond the measured amax)."""

    def __init__(self, cache, n_layers: int, n_kv: int, keep_queries: bool = False):
        self.cache, self.n_layers, self.n_kv, self.keep_queries = cache, n_layers, n_kv, keep_queries
        self.steps: list = []
        self.queries: list = []
        self.q_above = 0

    def _record(self, li: int, bounds: torch.Tensor, g: int) -> None:
        if li == 0 or not self.steps:
            self.steps.append(torch.zeros(self.n_layers, self.n_kv, dtype=torch.float64))
            self.queries.append({})
        per_kv = bounds.amax(dim=(0, 2)).reshape(self.n_kv, g).amax(-1) if bounds.numel() else \
            torch.zeros(self.n_kv, dtype=torch.float64)
        self.steps[-1][li] = torch.maximum(self.steps[-1][li], per_kv)
        if self.keep_queries:
            self.queries[-1][li] = bounds

    def layer_max(self) -> torch.Tensor:
        """(layers, KV heads): the largest certified bound over every recorded step."""
        if not self.steps:
            return torch.zeros(self.n_layers, self.n_kv, dtype=torch.float64)
        return torch.stack(self.steps).amax(0)

    @property
    def monitor(self) -> dict:
        return dict(self.cache.monitor, queries_above_q_max=self.q_above)


@contextlib.contextmanager
def certify(model, cache, keep_queries: bool = False, observer=None):
    """Route ``model``'s attention through the cache-paired certifying function inside the block: the output
    is the model's own attention (its implementation, mask, sliding window and scaling); on the side each
    call's bound is computed from the cache's stored K/V and recorded norms. Yields a :class:`Certifier`.
    ``observer(layer, query, key, value, bias, tau, bounds)``, if given, sees every call (tests, evaluation)."""
    from ..analysis.analyzer import attention_bias, refuse_unimplemented_attention
    from ..analysis.routing import routed_attention

    if not cache.error_norms:
        raise InvalidArgument("the plan records no error norms (its rule has no error_norms): nothing to certify at "
                              "run time; make the plan without --no-error-norms")
    if getattr(model, "dtype", torch.float32) != torch.float32:
        raise InvalidArgument(f"run-time certification needs a float32 model (got {model.dtype}): the recorded norms "
                              "bound the float32 values the cache returns")
    cert = Certifier(cache, len(cache.layers), len(cache.layers[0].rules))
    cert.keep_queries = keep_queries
    orig: dict = {}
    impl = model.config._attn_implementation or "eager"          # what the model runs outside the block

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        refuse_unimplemented_attention(module, dropout, kwargs, "the certifying attention")
        li = int(module.layer_idx)
        if li not in orig:
            orig[li] = _original_attention(impl, module)
        out = orig[li](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer = cache.layers[li]
        if key.shape[-2] != layer.get_seq_length():
            raise InvalidArgument(f"layer {li}: the attention reads {key.shape[-2]} positions, the cache holds "
                                  f"{layer.get_seq_length()}: certification needs the cache in use")
        d = query.shape[-1]
        tau = float(scaling if scaling is not None else getattr(module, "scaling", d ** -0.5))
        dk, dv = layer.error_bounds()
        bias = attention_bias(attention_mask, query, key, module)
        bounds = runtime_bounds(query.detach(), key.detach(), value.detach(), bias, tau, dk, dv)
        g = query.shape[1] // key.shape[1]
        cert._record(li, bounds, g)
        if observer is not None:
            observer(li, query.detach(), key.detach(), value.detach(), bias, tau, bounds)
        lim = cache.limits
        if lim:
            qn = query.detach().double().norm(dim=-1)                 # (B, Hq, n)
            qmax = torch.tensor([lim[(li, h // g)]["q_max"] for h in range(query.shape[1])], dtype=torch.float64)
            cert.q_above += int((qn > qmax.view(1, -1, 1)).sum())
        return out

    with routed_attention(model, attn, prefix="hnfverify_certify"):
        yield cert


def output_inputs(plan: dict) -> dict | None:
    """The suffix form's S_l, K, rho, Gamma and the plan's logit / KL bounds as floats rounded up (rho down);
    None with the product form."""
    from fractions import Fraction

    from ..core.bound import plan_bounds
    from ..core.planview import view
    from ..evaluation.attention import float_up

    pv = view(plan)
    comp = pv.composition
    if comp.form != "suffix":
        return None
    pb = plan_bounds(pv)
    big = Fraction(10) ** 300

    def up(x):
        return float("inf") if x > big else float_up(x)

    rho = float(comp.radius)
    rho = rho if Fraction(rho) <= comp.radius else float(__import__("numpy").nextafter(rho, 0))
    return {"suffix": [float_up(la.suffix) for la in pv.layers], "remainder": float_up(comp.remainder),
            "radius": rho, "gain": float_up(comp.logit_gain), "logit_bound": up(pb.logit), "kl_bound": up(pb.kl)}


#: a stated allowance for the float32 kernels two runs use (the bounds are of exact arithmetic, docs/design.md
#: §2.6): comparisons of a logit bound with what happens add FLOAT_ALLOWANCE * (1 + max_i |z~_i|) to it
FLOAT_ALLOWANCE = 1e-4


def injected_bounds(bounds: torch.Tensor, onorm: list) -> torch.Tensor:
    """b_(l,s) = sum_h ||W_o[:, group h]|| sqrt(sum_(j in h) bound_j(s)^2) >= ||e_l(s)|| (docs/design.md §2.6):
    bounds (B, Hq, n) per query head, onorm per KV head (floats rounded up) -> (B, n)."""
    g = bounds.shape[1] // len(onorm)
    b = sum(o * torch.sqrt((bounds[:, h * g:(h + 1) * g] ** 2).sum(1)) for h, o in enumerate(onorm))
    return b * (1 + 1e-12)


def logit_bounds(c: torch.Tensor, out: dict) -> torch.Tensor:
    """Z_t = Gamma Phi_t, Phi_t = sum_l S_l sqrt(C_l(t)) + (K/2) sum_l C_l(t), +inf where sum_l C_l(t) > rho^2
    (docs/design.md §2.6): c (L, ...) float64 cumulative squared injected bounds -> (...)."""
    s = torch.tensor(out["suffix"], dtype=torch.float64).reshape((-1,) + (1,) * (c.dim() - 1))
    tot = c.sum(0)
    phi = (s * c.sqrt()).sum(0) + out["remainder"] / 2 * tot
    z = out["gain"] * phi * (1 + 1e-12)
    return torch.where(tot <= out["radius"] ** 2, z, torch.full_like(z, float("inf")))


def greedy_certificate(cert: "Certifier", plan: dict, step_logits: list, chosen: list) -> dict | None:
    """Per generated token, the run-time claim of docs/design.md §2.6: with b_(l,s) = sum_h ||W_o[:, group h]||
    sqrt(sum_(j in h) bound_j(s)^2) from the certified per-query bounds (``certify(..., keep_queries=True)``),
    C_l(t) = sum_(s <= t) b_(l,s)^2, Phi_t = sum_l S_l sqrt(C_l(t)) + (K/2) sum_l C_l(t) (+inf outside the
    remainder's radius) and Z_t = Gamma Phi_t >= osc(dz_t): the token is certified "the same greedy token as
    the full-precision cache" when the quantized logits' margin (top minus second) > Z_t. The measured
    assumptions S_l, K, Gamma are the plan's (listed in it). ``step_logits``: per forward pass the (1, V)
    logits of its last position; ``chosen``: the token taken. None with the product form."""
    from ..core.planview import view
    from ..evaluation.attention import float_up

    out = output_inputs(plan)
    if out is None or len(cert.queries) != len(step_logits):
        return None
    pv = view(plan)
    onorm = [[float_up(h.o_proj_norm) for h in la.heads] for la in pv.layers]
    c = torch.zeros(len(pv.layers), dtype=torch.float64)
    z_all, cert_flags, margins = [], [], []
    for qb, logits in zip(cert.queries, step_logits):
        for li, b in qb.items():
            c[li] += float((injected_bounds(b[:1], onorm[li]) ** 2).sum())
        top2 = logits[0].double().topk(2).values
        m = float(top2[0] - top2[1])
        z = float(logit_bounds(c, out)) + FLOAT_ALLOWANCE * (1 + float(logits[0].double().abs().max()))
        z_all.append(z)
        margins.append(m)
        cert_flags.append(m > z)
    return {"z": z_all, "margin": margins, "certified": cert_flags, "chosen": list(chosen)}
