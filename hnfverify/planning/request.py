"""What the user asks for: ``PlanRequest`` (mode, eps, rule, objective) and the ``--uniform`` spec."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..core.numbers import fmt_number
from ..core.semantics import SEGMENTS
from ..core.vocabulary import Curvature, Objective
from ..errors import InvalidArgument

BUDGET_SPLIT = {
    Objective.FISHER.value: "greedy: largest reduction of the measured diagonal-Fisher estimate of the KL divergence "
              "(1/2 sum F e^2 over the calibration K/V, each format's actual error, recent and rest reads "
              "separated) per added cache bit, over all (layer, KV head, K|V, segment) units",
    Objective.END_TO_END.value: "greedy: largest reduction of the end-to-end bound per added cache bit, over all "
                  "(layer, KV head, K|V, segment) units",
    Objective.LAYERS.value: "greedy: largest reduction of the sum of the per-layer first-order attention-output bounds "
              "(no downstream amplification) per added cache bit, over all (layer, KV head, K|V, segment) units",
    Objective.LINEAR.value: "greedy: largest reduction of the sum over layers of the bounds' first-order Taylor terms "
              "(sum dV A + (m + M) B, no exponential) per added cache bit, over all (layer, KV head, K|V, segment) "
              "units",
}
OBJECTIVES = tuple(BUDGET_SPLIT)
EPS_SPLIT = ("Theorem 5.7 per key segment; per (layer, KV head) the shortest prefix of its greedy sequence "
             "(largest reduction of its bound E_h per added bit) with E_h <= eps; each unit takes the highest.")
ASSIGNED = "explicit per-unit formats given by the caller"
UNIFORM_KEYS = {"K", "V", "sink", "recent", "rest"} | {f"{kv}.{s}" for kv in "KV" for s in SEGMENTS}



def parse_uniform(spec: str) -> dict:
    """``--uniform`` spec -> {selector: format name}. A bare format is the default; ``K=``, ``V=``,
    ``rest=``, ``K.rest=`` ... override it (most specific wins: K.rest > K > rest > default). Example,
    KIVI-style: ``fp16,K.rest=int4_c32,V.rest=int4_t64`` with ``--sink 0 --recent 128``."""
    out: dict = {}
    for item in (x.strip() for x in str(spec).split(",")):
        if not item:
            raise InvalidArgument(f"--uniform {spec!r}: empty item")
        key, _, name = item.rpartition("=")
        key = key.strip() or "*"
        if key != "*" and key not in UNIFORM_KEYS:
            raise InvalidArgument(f"--uniform {spec!r}: unknown selector {key!r} (use K, V, sink, recent, rest or "
                                  "K.rest style)")
        if key in out:
            raise InvalidArgument(f"--uniform {spec!r}: {key!r} given twice")
        out[key] = name.strip()
    if "*" not in out and not all(f"{kv}.{s}" in out or kv in out or s in out for kv in "KV" for s in SEGMENTS):
        raise InvalidArgument(f"--uniform {spec!r}: give a default format (a bare name) or cover every K/V segment")
    return out


def uniform_format(sel: dict, kv: str, seg: str) -> str:
    for key in (f"{kv}.{seg}", kv, seg, "*"):
        if key in sel:
            return sel[key]
    raise AssertionError("parse_uniform guarantees a default")


@dataclass(frozen=True)
class PlanRequest:
    eps: Fraction | None = None
    eps_target: Fraction | None = None
    avg_bits: Fraction | None = None
    uniform: str | None = None
    c: Fraction = Fraction(4)
    sink: int = 4
    recent: int | None = 64               # None: --recent auto (the grid window with the lowest fisher estimate)
    lipschitz_margin: Fraction = Fraction(11, 10)
    curvature: str | None = None          # None: the report's choice
    max_seq_len: int | None = None
    objective: str | None = None          # what the greedy sequence lowers; None: fisher for --avg-bits where the
                                          # report measured it, else linear (resolved_objective)
    assign: tuple | None = None           # ((layer, head, "K"|"V", segment, format), ...): explicit plans
    error_norms: bool = True              # the cache records each stored vector's error norm (docs/design.md §4.1)
    composition: str | None = None        # "suffix" | "product" (docs/design.md §2.5); None: suffix where measured
    suffix_margin: Fraction = Fraction(2)
    max_kl: Fraction | None = None        # the KL budget of every token (docs/design.md §2.6)
    codebooks: bool = True                # searched plans may choose the codebook formats lmB_* (docs/design.md §2.3b)
    rotation: bool = True                 # searched plans may choose the Hadamard-rotated formats *_h (§2.3c)
    channel_group: int | str | None = "all"  # the searched plans' channel group (a divisor of the analysis'), or "all"
                                          # (default: a superset of every single group's search, same objective):
                                          # each unit picks among every divisor the analysis measured; None: the analysis'

    def validate(self) -> None:
        if isinstance(self.channel_group, str) and self.channel_group != "all":
            raise InvalidArgument(f"--channel-group must be an integer or all, got {self.channel_group!r}")
        modes = [x is not None for x in (self.eps, self.avg_bits, self.uniform, self.assign)]
        if not any(modes):
            raise InvalidArgument("give --eps, --avg-bits or --uniform")
        fixed = self.uniform is not None or self.assign is not None
        if fixed and (self.avg_bits is not None or self.eps_target is not None):
            raise InvalidArgument("--uniform cannot be combined with --avg-bits or --eps-target")
        if self.uniform is not None and self.assign is not None:
            raise InvalidArgument("uniform and assign are exclusive")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise InvalidArgument(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.eps is not None and self.eps <= 0:
            raise InvalidArgument(f"--eps must be > 0, got {fmt_number(self.eps)}")
        if self.eps_target is not None and self.eps_target <= 0:
            raise InvalidArgument(f"--eps-target must be > 0, got {fmt_number(self.eps_target)}")
        if self.avg_bits is not None and self.avg_bits <= 0:
            raise InvalidArgument(f"--avg-bits must be > 0, got {fmt_number(self.avg_bits)}")
        if self.c <= 0:
            raise InvalidArgument(f"--c must be > 0, got {fmt_number(self.c)}")
        if self.composition not in (None, "suffix", "product"):
            raise InvalidArgument(f"--composition must be suffix or product, got {self.composition!r}")
        if self.suffix_margin < 1:
            raise InvalidArgument(f"--suffix-margin must be >= 1, got {fmt_number(self.suffix_margin)}")
        if self.max_kl is not None and self.max_kl <= 0:
            raise InvalidArgument(f"--max-kl must be > 0, got {fmt_number(self.max_kl)}")
        if self.max_kl is not None and self.composition == "product":
            raise InvalidArgument("--max-kl needs --composition suffix: the product form makes no claim about the logits")
        if self.lipschitz_margin < 1:
            raise InvalidArgument(f"--lipschitz-margin must be >= 1, got {fmt_number(self.lipschitz_margin)}")
        if self.curvature not in (None, *Curvature.values()):
            raise InvalidArgument(f"--curvature must be exact or seed, got {self.curvature!r}")


def resolved_objective(req: PlanRequest, arrays: dict) -> str:
    """The objective a request plans with: its own, else ``fisher`` for ``--avg-bits`` where the report has the
    measured sensitivities (analyze --fisher-tokens > 0), else ``linear``."""
    if req.objective == Objective.FISHER.value and "fisher" not in arrays:
        raise InvalidArgument("--objective fisher: the report has no measured sensitivities (analyzed with "
                              "--fisher-tokens 0); re-run analyze or choose another objective")
    if req.objective is not None:
        return req.objective
    if req.avg_bits is not None and "fisher" in arrays:
        return Objective.FISHER.value
    return Objective.LINEAR.value
