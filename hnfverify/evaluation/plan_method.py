"""The plan as a :class:`Method`: its attention, bytes and certified bounds."""

from __future__ import annotations

from .attention import head_bounds, plan_attention
from .accounting import accounting_units, accounted_bytes, real_cache_bytes
from .method import Method


def plan_method(name: str, plan: dict) -> Method:
    bounds, e_l, _ = head_bounds(plan)
    units = accounting_units(plan)

    def nbytes(window_stats, t_len):
        kv = {li: (k[:, :, :t_len], v[:, :, :t_len]) for li, (k, v) in window_stats.kv.items()}
        return real_cache_bytes(plan, kv, t_len)

    def context(model, prefix, window_stats):
        return plan_attention(model, plan, prefix, bounds, window_stats)

    from ..core.semantics import norm_bits

    nb = norm_bits(plan["rule"])
    return Method(name, context, nbytes, bounds, e_l,
                  accounted=lambda window_stats, n: accounted_bytes(units, plan["shape"]["head_dim"], n, nb),
                  output=output_inputs(plan))


def output_inputs(plan: dict) -> dict | None:
    """The suffix form's S_l, K, rho, Gamma and the plan's logit / KL bounds as floats rounded up (rho down);
    None with the product form."""
    from fractions import Fraction

    from ..core.bound import plan_bounds
    from ..core.planview import view
    from .attention import float_up

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
