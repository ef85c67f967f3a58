"""The planner: an analysis report -> a rule plan (``plan_from_report``; docs/design.md §3, §4).

    request    PlanRequest, the --uniform spec, the objectives
    units      one (layer, KV head, K|V, segment) unit: inputs and chain of formats
    search     the float twins of the bounds and the greedy sequence
    modes      one function per mode: fixed formats, --avg-bits, --eps (--eps-target)
    assemble   Theorem 5.7 for every stored form, the claims, the plan document
    planner    plan_from_report: the steps in order
"""

from ..errors import PlanInfeasible
from .assemble import claim_up
from .planner import plan_from_report
from .request import OBJECTIVES, PlanRequest, parse_uniform, uniform_format
from .units import build_chain, units_from_report

__all__ = ["OBJECTIVES", "PlanInfeasible", "PlanRequest", "build_chain", "claim_up", "parse_uniform",
           "plan_from_report", "uniform_format", "units_from_report"]
