"""The plan rules of docs/design.md §3 that the JSON Schema cannot express, beyond the structural
ones in ``plan._semantic_problems``: consistency between fields a plan states twice, positivity of the
quantities the bounds divide or multiply by, and formats the runtime cache can hold. Each problem is
(JSON path, message); a plan with any is rejected (exit 2), never decided on a guess. Runs after the
numbers parsed, so ``parse_number`` does not fail here. No torch.
"""

from __future__ import annotations

from .formats import GgmlFormat, RotatedFormat, by_name, is_power_of_two
from .numbers import fmt_number, parse_number
from .semantics import SEGMENTS


def _gain_problems(g: dict, path: str) -> list[tuple[str, str]]:
    """A measured quantity: margin >= 1 and value >= measured x margin."""
    meas, margin, value = (parse_number(g[k]) for k in ("measured", "margin", "value"))
    out = []
    if margin < 1:
        out.append((f"{path}.margin", f"must be >= 1, got {g['margin']}"))
    if value < meas * margin:
        out.append((f"{path}.value", f"{g['value']} is below measured x margin = {fmt_number(meas * margin)}"))
    return out


def consistency_problems(plan: dict) -> list[tuple[str, str]]:
    probs: list[tuple[str, str]] = []
    add = lambda path, msg: probs.append((path, msg))  # noqa: E731
    t = plan["max_seq_len"]
    d = plan["shape"]["head_dim"]
    group = plan["analysis"]["channel_group"]
    for key in ("eps", "c"):
        if parse_number(plan[key]) <= 0:
            add(f"$.{key}", f"must be > 0, got {plan[key]}")
    if plan["eps_target"] is not None and parse_number(plan["eps_target"]) <= 0:
        add("$.eps_target", f"must be > 0 or null, got {plan['eps_target']}")
    if plan["max_kl"] is not None and parse_number(plan["max_kl"]) <= 0:
        add("$.max_kl", f"must be > 0 or null, got {plan['max_kl']}")
    comp = plan["composition"]
    suffix = comp["form"] == "suffix"              # docs/design.md §2.5: one form, its inputs present iff it is used
    for key in ("remainder", "logit_gain"):
        if (comp[key] is not None) != suffix:
            add(f"$.composition.{key}", "required with the suffix form, null with the product form")
        elif comp[key] is not None:
            probs += _gain_problems(comp[key], f"$.composition.{key}")
    if plan["mode"]["kind"] == "eps" and plan["eps_source"] != "user":
        add("$.eps_source", f"an eps plan's eps is the user's budget: must be 'user', got {plan['eps_source']!r}")
    n_l = len(plan["layers"])
    for key in ("layer_bounds", "attention_error_max"):
        if len(plan["claims"][key]) != n_l:
            add(f"$.claims.{key}", f"has {len(plan['claims'][key])} entries for {n_l} layers")
    for name in plan["formats"]:
        try:
            f = by_name(name)
        except Exception:       # reported by the structural rules
            continue
        if isinstance(f, GgmlFormat):
            if d % f.group:
                add(f"$.formats.{name}", f"{name} quantizes blocks of {f.group} channels: head_dim {d} is not a "
                                         "multiple of it")
        elif f.granularity == "token" and f.group != d:
            add(f"$.formats.{name}", f"a per-token format groups the head's {d} channels (head_dim); group {f.group} "
                                     "cannot run")
        if isinstance(f, RotatedFormat) and not is_power_of_two(d):
            add(f"$.formats.{name}", f"{name} is Hadamard-rotated: that needs a power-of-two head_dim, got {d}")
        if f.granularity == "channel" and group % f.group:
            # a group aligned at multiples of f.group lies inside one aligned group of the analysis' (docs/design.md §3)
            add(f"$.formats.{name}", f"channel group {f.group} does not divide $.analysis.channel_group {group}, the "
                                     "group the analysis measured d_channel over")
    rule_s, rule_r = plan["rule"]["sink"], plan["rule"]["recent"]
    for li, layer in enumerate(plan["layers"]):
        lp = f"$.layers[{li}]"
        if parse_number(layer["tau"]) <= 0:
            add(f"{lp}.tau", f"must be > 0, got {layer['tau']}")
        if (layer["suffix"] is not None) != suffix:
            add(f"{lp}.suffix", "required with the suffix form, null with the product form")
        for gain in ("lipschitz", "mlp_lipschitz", "suffix"):
            if layer.get(gain) is not None:
                probs += _gain_problems(layer[gain], f"{lp}.{gain}")
        for hi, head in enumerate(layer["heads"]):
            hp = f"{lp}.heads[{hi}]"
            if parse_number(head["o_proj_norm"]) <= 0:
                add(f"{hp}.o_proj_norm", f"must be > 0, got {head['o_proj_norm']}")
            q_max = parse_number(head["q_max"])
            for kv in ("K", "V"):
                rule = head[kv]
                rp = f"{hp}.{kv}"
                s_len, r_len = rule["sink"]["length"], rule["recent"]["length"]
                if (s_len, r_len) != (rule_s, rule_r):
                    add(rp, f"sink/recent lengths ({s_len}, {r_len}) differ from $.rule ({rule_s}, {rule_r}); K and V "
                            "of every head follow the plan's one rule")
                rest_len = max(0, t - s_len - r_len)
                if "length" in rule["rest"] and rule["rest"]["length"] != rest_len:
                    add(f"{rp}.rest.length", f"must be max_seq_len - sink - recent = {rest_len}, got "
                                             f"{rule['rest']['length']}")
                items = [(f"{rp}.{seg}", seg, rule[seg]) for seg in SEGMENTS] + \
                    [(f"{rp}.blocks[{bi}]", "block", b) for bi, b in enumerate(rule["blocks"])]
                for path, seg, item in items:
                    try:
                        f = by_name(item["format"])
                    except Exception:
                        continue
                    empty = seg != "block" and (rule[seg].get("length", rest_len) if seg != "rest" else rest_len) == 0
                    if f.granularity == "channel" and seg != "rest" and not empty:
                        add(f"{path}.format", f"{f.name} is channel-grouped; the cache writes the {seg} one token at "
                                              "a time (channel groups only for the rest)")
                    inp = item["inputs"]
                    if inp is not None and parse_number(inp["qnorm"][1]) > q_max:
                        add(f"{hp}.q_max", f"{head['q_max']} is below {path}.inputs.qnorm's upper end "
                                           f"{inp['qnorm'][1]}")
    return probs
