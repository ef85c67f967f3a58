"""``Method``: one way of holding the past K/V in the teacher-forced pass (the plan, a peer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Method:
    """One way of holding the past K/V in a teacher-forced pass. ``context(model, prefix, stats)``
    routes attention; ``nbytes(stats, t_len)`` counts the real bytes of the packed cache at t_len;
    ``bounds`` (per (layer, head)) and ``e_l`` are the certified bounds, or None for peers."""
    name: str
    context: object
    nbytes: object
    bounds: dict | None = None
    e_l: float | None = None
    protocol: str = "teacher-forced pass equal to plan-cache decoding (see hnfverify.evaluation.attention)"
    accounted: object = None      # (stats, n) -> bytes by the formats' accounting (cheap; at every length)
    output: dict | None = None    # the suffix form's inputs and the plan's logit / KL bounds (docs/design.md §2.5, §2.6)
