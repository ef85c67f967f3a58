"""Evaluation of a plan (and of peers) on held-out text: ``hnfverify eval`` (docs/design.md §4).

    attention     the teacher-forced pass: what every scored query reads, per the plan's semantics
    accounting    the plan cache's bytes: real packed bytes and the accounting of §4
    method        ``Method``: one way of holding the past K/V
    plan_method   the plan as a Method (its certified bounds checked on every query)
    quanto        transformers' QuantizedCache (optimum-quanto) as a Method, for the benchmarks
    evaluate      quality and soundness of methods over windows
"""

from .accounting import accounted_bytes, accounting_units
from .attention import WindowStats, head_bounds, plan_attention
from .evaluate import evaluate, evaluate_methods
from .method import Method
from .plan_method import plan_method

__all__ = ["Method", "WindowStats", "accounted_bytes", "accounting_units", "evaluate", "evaluate_methods",
           "head_bounds", "plan_attention", "plan_method"]
