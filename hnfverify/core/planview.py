"""The plan parsed once into typed values (docs/design.md §3, §4): per layer, KV head and K|V the
stream rule (lengths, formats), the segments' interval inputs as exact upper ends, and the blocks.
The checker, the bounds, the planner's claims, the cache and the evaluation read a plan through this
view; only ``hnfverify.core.recheck`` keeps its own reading. Assumes a plan that ``plan.validate_plan``
accepted. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from .formats import Format, SegmentStats, by_name
from .numbers import parse_number
from .semantics import SEGMENTS, StreamRule, segment_lengths


@dataclass(frozen=True)
class Block:
    start: int
    end: int
    fmt: Format
    stats: SegmentStats
    kappa: Fraction


@dataclass(frozen=True)
class StreamView:
    """One (layer, KV head, K|V). ``stats``/``kappa``/``inputs`` hold only the non-empty segments."""

    layer: int
    head: int
    kv: str
    rule: StreamRule
    lengths: dict
    stats: dict
    kappa: dict
    inputs: dict
    blocks: tuple


@dataclass(frozen=True)
class HeadView:
    layer: int
    head: int
    q_max: Fraction
    o_proj_norm: Fraction
    keys: StreamView
    values: StreamView
    mass_alpha: dict          # segment -> upper end (the larger of the K and the V rule's)
    mass_avo: dict
    spread: dict              # segment -> upper end of max ||V_t - o|| ("vo"), the larger of the K and the V rule's


@dataclass(frozen=True)
class LayerView:
    index: int
    tau: Fraction
    lipschitz: Fraction
    mlp_lipschitz: Fraction
    suffix: Fraction | None          # S_l (docs/design.md §2.5), None with the product form
    heads: tuple


@dataclass(frozen=True)
class Composition:
    """docs/design.md §2.5: ``form`` "suffix" (remainder K, its radius rho, the lm_head gain Gamma) or "product"."""

    form: str
    remainder: Fraction | None
    radius: Fraction | None
    logit_gain: Fraction | None


@dataclass(frozen=True)
class PlanView:
    max_seq_len: int
    head_dim: int
    query_group: int          # query heads per KV head
    eps: Fraction
    eps_target: Fraction | None
    eps_source: str
    c: Fraction
    layers: tuple
    composition: Composition
    max_kl: Fraction | None

    def heads(self):
        for layer in self.layers:
            yield from layer.heads

    def streams(self):
        for h in self.heads():
            yield h.keys
            yield h.values


def _hi(interval) -> Fraction:
    return parse_number(interval[1])


def segment_stats(inputs: dict, d: int) -> SegmentStats:
    opt = [_hi(inputs[k]) if k in inputs else None for k in ("d_token_h", "amax_h")]
    return SegmentStats(d, _hi(inputs["d_token"]), _hi(inputs["d_channel"]), _hi(inputs["amax"]), *opt)


def _stream(layer: int, head: int, kv: str, rule: dict, t: int, d: int) -> StreamView:
    s_len, r_len = rule["sink"]["length"], rule["recent"]["length"]
    lengths = segment_lengths(s_len, r_len, t)
    fmts = {seg: by_name(rule[seg]["format"]) for seg in SEGMENTS}
    stats, kappa, inputs = {}, {}, {}
    for seg in SEGMENTS:
        inp = rule[seg]["inputs"]
        if lengths[seg] and inp is not None:
            inputs[seg] = inp
            stats[seg] = segment_stats(inp, d)
            kappa[seg] = _hi(inp["kappa"]) if kv == "K" else Fraction(0)
    blocks = tuple(Block(b["start"], b["end"], by_name(b["format"]), segment_stats(b["inputs"], d),
                         _hi(b["inputs"]["kappa"]) if kv == "K" else Fraction(0)) for b in rule["blocks"])
    return StreamView(layer, head, kv, StreamRule(s_len, r_len, fmts), lengths, stats, kappa, inputs, blocks)


def view(plan: dict) -> PlanView:
    t, d = plan["max_seq_len"], plan["shape"]["head_dim"]
    layers = []
    for layer in plan["layers"]:
        li = layer["layer"]
        heads = []
        for head in layer["heads"]:
            k = _stream(li, head["kv_head"], "K", head["K"], t, d)
            v = _stream(li, head["kv_head"], "V", head["V"], t, d)
            ma, mv, sp = {}, {}, {}
            for seg in k.inputs:
                both = [k.inputs[seg]] + ([v.inputs[seg]] if seg in v.inputs else [])
                ma[seg] = max(_hi(x["mass_alpha"]) for x in both)
                mv[seg] = max(_hi(x["mass_avo"]) for x in both)
                sp[seg] = max(_hi(x["vo"]) for x in both)
            heads.append(HeadView(li, head["kv_head"], parse_number(head["q_max"]), parse_number(head["o_proj_norm"]),
                                  k, v, ma, mv, sp))
        layers.append(LayerView(li, parse_number(layer["tau"]), parse_number(layer["lipschitz"]["value"]),
                                parse_number(layer["mlp_lipschitz"]["value"]), _value(layer["suffix"]), tuple(heads)))
    eps_t = plan["eps_target"]
    comp = plan["composition"]
    rem = comp["remainder"]
    composition = Composition(comp["form"], _value(rem), parse_number(rem["radius"]) if rem else None,
                              _value(comp["logit_gain"]))
    return PlanView(t, d, plan["shape"]["query_heads"] // plan["shape"]["kv_heads"], parse_number(plan["eps"]),
                    parse_number(eps_t) if eps_t is not None else None, plan["eps_source"], parse_number(plan["c"]),
                    tuple(layers), composition, parse_number(plan["max_kl"]) if plan["max_kl"] is not None else None)


def _value(gain) -> Fraction | None:
    return None if gain is None else parse_number(gain["value"])
