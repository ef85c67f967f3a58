"""The plan as a :class:`Method`: its attention, bytes and certified bounds."""

from __future__ import annotations

from .attention import head_bounds, plan_attention, plan_parts
from .accounting import accounted_bytes, accounting_units, real_cache_bytes
from .method import Method
from ..kv.certify import output_inputs


def plan_method(name: str, plan: dict) -> Method:
    bounds, e_l, _ = head_bounds(plan)
    parts = plan_parts(plan)
    units = accounting_units(plan, parts[0])

    def nbytes(window_stats, t_len):
        kv = {li: (k[:, :, :t_len], v[:, :, :t_len]) for li, (k, v) in window_stats.kv.items()}
        return real_cache_bytes(plan, kv, t_len, parts[0])

    def context(model, prefix, window_stats):
        return plan_attention(model, plan, prefix, bounds, window_stats, parts)

    from ..core.semantics import norm_bits

    nb = norm_bits(plan["rule"])
    return Method(name, context, nbytes, bounds, e_l,
                  accounted=lambda window_stats, n: accounted_bytes(units, plan["shape"]["head_dim"], n, nb),
                  output=output_inputs(plan))

