"""The plan as a :class:`Method`: its attention, bytes and certified bounds."""

from __future__ import annotations

from .attention import head_bounds, plan_attention
from .accounting import accounting_units, accounted_bytes, real_cache_bytes
from .method import Method


def plan_method(name: str, plan: dict) -> Method:
    bounds, e_l, _ = head_bounds(plan)
    units = accounting_units(plan)

    def nbytes(st, t_len):
        return real_cache_bytes(plan, {li: (k[:, :, :t_len], v[:, :, :t_len]) for li, (k, v) in st.kv.items()}, t_len)

    return Method(name, lambda model, prefix, st: plan_attention(model, plan, prefix, bounds, st), nbytes,
                  bounds, e_l, accounted=lambda st, n: accounted_bytes(units, plan["shape"]["head_dim"], n))
