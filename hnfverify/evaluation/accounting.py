"""Bytes of a plan cache: the real packed bytes of a window's K/V, and the accounting of docs/design.md §4."""

from __future__ import annotations

from .attention import plan_rules


def real_cache_bytes(plan: dict, kv: dict, t_len: int, rules: dict | None = None) -> int:
    """Bytes of the packed cache holding the window's K/V at length t_len, as a plan cache stores them
    after one-token steps (``semantics.stored_counts``), quantized for real: values, scales,
    zero-points, FP32 pending positions. ``rules``: ``plan_rules(plan)`` when the caller has it."""
    from ..kv.quant import quantize
    from ..core.semantics import norm_bits, stored_counts

    rules = rules if rules is not None else plan_rules(plan)
    total = 0
    for li, (k, v) in kv.items():
        for h in range(k.shape[1]):
            for x, rule in zip((k[0, h].float(), v[0, h].float()), rules[(li, h)]):
                c = stored_counts(rule, t_len)
                f = rule.formats
                s, n_rest = c["sink"], c["rest"]
                if s:
                    total += quantize(x[:s], f["sink"]).nbytes
                if rule.channel_group is None:
                    if n_rest:
                        total += quantize(x[s:s + n_rest], f["rest"]).nbytes
                else:
                    lo = s
                    for m in c["rest_groups"]:
                        total += quantize(x[lo:lo + m], f["rest"], group_tokens=m).nbytes
                        lo += m
                total += c["pending"] * x.shape[1] * 4
                if c["recent"]:
                    total += quantize(x[t_len - c["recent"]:t_len], f["recent"]).nbytes
                total += norm_bits(plan["rule"]) * t_len // 8          # one code per stored position
    return total


def accounting_units(plan: dict, rules: dict | None = None) -> list:
    """The StreamRule of every (layer, KV head, K|V) of a rule plan (``rules``: ``plan_rules(plan)`` if known)."""
    return [r for pair in (rules if rules is not None else plan_rules(plan)).values() for r in pair]


def accounted_bytes(units: list, d: int, n: int, norm_bits: int = 0) -> int:
    """Bytes of a plan cache holding n positions by the accounting of docs/design.md §4 (the planner's
    claims use the same; the cache's real packed bytes agree, tests/kv/test_cache_semantics.py);
    ``norm_bits``: per position and stream for the recorded error norms (``semantics.norm_bits``)."""
    from ..core.semantics import SEGMENTS, segment_bits, stored_counts

    bits = norm_bits * n * len(units)
    # streams with the same sink, recent window and formats occupy the same bits: count each kind once
    kinds: dict = {}
    for rule in units:
        key = (rule.sink, rule.recent, tuple(rule.formats[seg].name for seg in SEGMENTS))
        kinds.setdefault(key, [rule, 0])[1] += 1
    for rule, mult in kinds.values():
        c = stored_counts(rule, n)
        bits += mult * sum(segment_bits(rule.formats[seg], seg, c, d) for seg in SEGMENTS)
    return int(bits) // 8
