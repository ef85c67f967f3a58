"""The claims about the output (docs/design.md §2.5, §2.6) against what really happens, per scored token.

Per window: dz_t = z~_t - z_t (the plan's logits minus the reference), osc(dz_t), KL both ways, the
greedy choices, and the quantized logits' margin (top minus second). Bounds: the plan-time logit
oscillation Z and KL bound (one number per plan), and the run-time Z_t = Gamma Phi_t with
Phi_t = sum_l S_l sqrt(C_l(t)) + (K/2) sum_l C_l(t), C_l(t) = sum_{s <= t} b_(l,s)^2 from the run-time
attention bounds of the positions before t (+inf outside the remainder's radius). The measured
assumptions (S_l, K) are checked directly: with the actual injected errors e_l, the actual ||dH||_F must
be <= sum_l S_l ||e_l||_F + (K/2) sum_l ||e_l||_F^2 (reported per window, never hidden).

The bounds are of exact arithmetic; the two passes run different float32 kernels, whose logits differ by
~1e-4 even where the cache is read exactly. Every comparison therefore adds the allowance
``FLOAT_ALLOWANCE * (1 + max_i |z~_t,i|)`` to Z (a stated allowance, not derived; the floor measured at the
exactly-read prefix positions is reported next to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kv.certify import FLOAT_ALLOWANCE, logit_bounds


@dataclass
class OutputAcc:
    osc: list = field(default_factory=list)
    kl_fwd: list = field(default_factory=list)
    kl_rev: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    margin: list = field(default_factory=list)
    allow: list = field(default_factory=list)
    floor: float = 0.0            # the largest osc(dz) at positions that read the cache exactly
    z_rt: list = field(default_factory=list)
    assumption_ratio: list = field(default_factory=list)     # actual ||dH||_F / predicted, per window
    windows_outside_radius: int = 0


def add_window(acc: OutputAcc, out: dict, lr, lq, zr, zq, stats, prefix: int, t_len: int, dh_frob: float) -> None:
    """lr, lq: log-probabilities (n, V) float64 at logit positions prefix-1 .. t_len-2; zr, zq the logits there."""
    import torch

    dz = zq - zr
    acc.osc.append(dz.amax(-1) - dz.amin(-1))
    pr, pq = lr.exp(), lq.exp()
    acc.kl_fwd.append((pr * (lr - lq)).sum(-1).clamp(min=0.0))
    acc.kl_rev.append((pq * (lq - lr)).sum(-1).clamp(min=0.0))
    acc.changed.append(zr.argmax(-1) != zq.argmax(-1))
    top2 = zq.topk(2, dim=-1).values
    acc.margin.append(top2[:, 0] - top2[:, 1])
    acc.allow.append(FLOAT_ALLOWANCE * (1 + zq.abs().amax(-1)))
    acc.floor = max(acc.floor, float((dz[:1].amax(-1) - dz[:1].amin(-1)).max()))
    layers = range(len(out["suffix"]))
    n = t_len - prefix
    # run-time: C_l(t) over the scored positions s <= t (the prefix reads exactly: no error there)
    if stats.inj_rt:
        c = torch.stack([torch.cumsum(stats.inj_rt[li] ** 2, 0) for li in layers])     # (L, n)
        c = torch.cat([torch.zeros(len(layers), 1, dtype=torch.float64), c[:, :n - 1]], 1)  # logits at p see s <= p
        acc.z_rt.append(logit_bounds(c, out))
    # the measured assumptions themselves, with the actual injected errors
    sq = [float(stats.inj_act[li].sum()) for li in layers]
    if sum(sq) > out["radius"] ** 2:
        acc.windows_outside_radius += 1
    pred = sum(sl * math.sqrt(x) for sl, x in zip(out["suffix"], sq)) + out["remainder"] / 2 * sum(sq)
    if pred > 0:
        acc.assumption_ratio.append(dh_frob / pred)
    elif dh_frob > 0:
        acc.assumption_ratio.append(math.inf)


def _ratios(bound, actual):
    """bound / actual over the tokens with actual > 0 (numpy), and the number with actual > bound."""
    import numpy as np

    b = np.broadcast_to(np.asarray(bound, dtype=np.float64), actual.shape)
    pos = actual > 0
    return b[pos] / actual[pos], int((actual > b).sum())


def _stats(r):
    import numpy as np

    if r.size == 0:
        return {"median": None, "min": None, "max": None}
    fin = lambda x: None if not math.isfinite(x) else float(x)  # noqa: E731
    return {"median": fin(np.median(r)), "min": fin(r.min()), "max": fin(r.max())}


def summarize(acc: OutputAcc, out: dict) -> dict:
    import numpy as np
    import torch

    osc = torch.cat(acc.osc).numpy()
    klf, klr = torch.cat(acc.kl_fwd).numpy(), torch.cat(acc.kl_rev).numpy()
    kl = np.maximum(klf, klr)
    changed = torch.cat(acc.changed).numpy()
    margin = torch.cat(acc.margin).numpy()
    allow = torch.cat(acc.allow).numpy()
    res = {"tokens": int(osc.size), "logit_osc_actual_median": float(np.median(osc)),
           "greedy_changed": int(changed.sum()), "float_allowance_median": float(np.median(allow)),
           "float_floor_at_exact_positions": acc.floor}

    def claims(prefix, z):
        z0 = np.broadcast_to(np.asarray(z, dtype=np.float64), osc.shape)
        zb = z0 + allow                                   # what the comparisons use (see the module doc)
        lr, _ = _ratios(z0, osc)
        _, lv = _ratios(zb, osc)
        kr, _ = _ratios(z0 * z0 / 8, kl)
        _, kv = _ratios(zb * zb / 8, kl)
        cert = margin > zb
        res.update({f"{prefix}logit_bound_over_actual_{k}": v for k, v in _stats(lr).items()})
        res.update({f"{prefix}kl_bound_over_actual_{k}": v for k, v in _stats(kr).items()})
        res[f"{prefix}logit_bound_violations"] = lv
        res[f"{prefix}kl_bound_violations"] = kv
        res[f"{prefix}greedy_certified"] = int(cert.sum())
        res[f"{prefix}greedy_certified_fraction"] = float(cert.mean()) if cert.size else None
        res[f"{prefix}greedy_certified_but_changed"] = int((cert & changed).sum())

    res["logit_bound"] = out["logit_bound"] if math.isfinite(out["logit_bound"]) else None
    res["kl_bound"] = out["kl_bound"] if math.isfinite(out["kl_bound"]) else None
    claims("", out["logit_bound"])
    if acc.z_rt:
        z = torch.cat(acc.z_rt).numpy()
        res["runtime_logit_bound_median"] = float(np.median(z)) if np.isfinite(np.median(z)) else None
        res["runtime_tokens_outside_radius"] = int((~np.isfinite(z)).sum())
        claims("runtime_", z)
    a = np.array(acc.assumption_ratio)
    res["suffix_assumption_windows"] = int(a.size)
    res["suffix_assumption_violations"] = int((a > 1).sum())
    res["suffix_assumption_actual_over_predicted_max"] = float(a.max()) if a.size and np.isfinite(a.max()) else (
        None if not a.size else "inf")
    res["suffix_assumption_windows_outside_radius"] = acc.windows_outside_radius
    # which window, by how much: actual ||dH||_F / the suffix model's prediction, per window in order
    res["suffix_assumption_actual_over_predicted_per_window"] = [float(x) if np.isfinite(x) else "inf" for x in a]
    return res
