"""The analysis report: a JSON summary plus a safetensors file of per-position arrays (no pickle).

``report.json`` holds identities (model, calibration text, tool versions), options, shapes, a
per-layer summary and the sha256 of ``report.safetensors``; the arrays file holds every
(layer, kv_head, position) interval. Both are written atomically (arrays first).

Array fields, shape (layers, kv_heads, positions) unless noted; ``_lo``/``_hi`` enclose the exact
maximum over all calibration queries that attend to the position (see ``hnfverify.analysis.curvature``):
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from ..errors import InputError, InvalidArgument

SCHEMA_VERSION = 1
KIND = "hnfverify-analysis"

ARRAY_FIELDS = {
    "kappa_lo": "curvature used for planning (exact unless options.curvature == 'seed'), lower end",
    "kappa_hi": "curvature used for planning, upper end",
    "kappa_exact_lo": "exact key curvature max_q 1/2 tau^2 |q|^2 a |1-2a| |V_t - o|, lower end",
    "kappa_exact_hi": "exact key curvature, upper end",
    "kappa_seed": "the original proposal's heuristic (attention x gradient x Hessian trace x recency); ablation only",
    "kappa_v": "value curvature: identically 0 (attention output is linear in V_t)",
    "alpha_max_lo": "max attention weight alpha_t, lower end", "alpha_max_hi": "max attention weight, upper end",
    "alpha_mean": "mean attention weight over attending queries",
    "qnorm_max_lo": "max ||q|| over attending queries, lower end", "qnorm_max_hi": "upper end",
    "vo_max_lo": "max ||V_t - o||, lower end", "vo_max_hi": "upper end",
    "alpha_vo_max_lo": "max alpha_t ||V_t - o|| (first-order value-mixing term), lower end",
    "alpha_vo_max_hi": "upper end",
    "grad_k_lo": "max ||d o / d K_t|| = tau ||q|| alpha_t ||V_t - o||, lower end", "grad_k_hi": "upper end",
    "htrace_lo": "max tau^2 |q|^2 alpha |1-2alpha| |V_t - o| (seed's Hessian-trace factor)", "htrace_hi": "upper end",
    "n_queries": "number of (query head, query position) pairs that attend to the position (int64)",
    "k_tok_min": "per-token min of K over its head_dim channels (float32, min over windows)",
    "k_tok_max": "per-token max of K (float32, max over windows)",
    "v_tok_min": "per-token min of V", "v_tok_max": "per-token max of V",
    "k_ch_min": "(layers, kv_heads, channel_groups, head_dim) per-channel min of K over groups of channel_group tokens",
    "k_ch_max": "per-channel max of K", "v_ch_min": "per-channel min of V", "v_ch_max": "per-channel max of V",
    "k_d_token": "l2 diameter of K_t's per-token quantization box sqrt(d)(max-min), max over windows",
    "k_d_channel": "l2 diameter of K_t's per-channel-group box ||max_c - min_c||, max over windows",
    "v_d_token": "as k_d_token for V", "v_d_channel": "as k_d_channel for V",
    "k_rot_min": "per-token min of H K_t (H the normalized Hadamard of head_dim, float64 pushed out by its rounding; "
                 "power-of-two head_dim only, docs/design.md 2.3c)", "k_rot_max": "per-token max of H K_t",
    "v_rot_min": "per-token min of H V_t", "v_rot_max": "per-token max of H V_t",
    "k_d_token_h": "as k_d_token for H K_t", "v_d_token_h": "as k_d_token for H V_t",
    "k_d_channel_gN": "as k_d_channel over groups of N tokens, for every N in analysis.channel_groups below channel_group "
                      "(the groups a plan may use instead, docs/design.md 3)", "v_d_channel_gN": "as k_d_channel_gN for V",
    "o_proj_norm_qhead": "(layers, query_heads) spectral norm of the output projection's slice for each query head",
    "o_proj_norm_kvhead": "(layers, kv_heads) spectral norm of the output projection's slice for each KV group",
    "lipschitz": "(layers,) MEASURED local Lipschitz estimate of each decoder block (Golub-Kahan-Lanczos, double vjp)",
    "lipschitz_rel_change": "(layers,) relative change of the estimate in the last Lanczos step",
    "mlp_lipschitz": "(layers,) MEASURED local Lipschitz estimate of the rest of each block after its attention, "
                     "the map from the attention output to the block output, the block input fixed (Lanczos per "
                     "token at the same points; docs/design.md 2.5a)",
    "mlp_lipschitz_rel_change": "(layers,) relative change of that estimate in the last Lanczos step",
    "scaling": "(layers,) attention score scale tau",
    "suffix": "(layers,) MEASURED suffix sensitivity S_l: power-iteration estimate of the spectral norm of the Jacobian "
              "from layer l's attention output (all positions) to the lm_head input (all positions), docs/design.md 2.5",
    "suffix_rel_change": "(layers,) relative change of that estimate in the last Lanczos step",
    "suffix_remainder": "(1,) MEASURED second-order constant K: max over probes of 2 ||F(e) - F(0) - J e|| / ||e||^2",
    "suffix_radius": "(1,) rho: the largest ||e|| the remainder was probed at",
    "logit_gain": "(1,) Gamma = 2 max_i ||w_i|| over the lm_head rows (osc of a logit change <= Gamma ||dH||)",
    "kappa_far_lo": "(layers, windows, kv_heads, positions) max kappa over queries at distance i - t >= R, "
                    "for R in rule_grid.windows; lower end",
    "kappa_far_hi": "upper end",
    "kappa_near_lo": "(layers, windows, kv_heads, positions) max kappa over queries at distance i - t < R; lower end",
    "kappa_near_hi": "upper end",
    "mass_alpha_lo": "(layers, sinks, windows, 3, kv_heads) max over queries of the attention mass on the sink / "
                     "recent / rest segment of the rule (S, R) in rule_grid; lower end",
    "mass_alpha_hi": "upper end",
    "mass_avo_lo": "(layers, sinks, windows, 3, kv_heads) max over queries of sum over the segment of "
                   "alpha_t ||V_t - o||; lower end",
    "mass_avo_hi": "upper end",
    "fisher": "(layers, kv_heads, 2 [K, V], 3 [sink, recent, rest], windows, formats, position intervals) MEASURED "
              "diagonal-Fisher estimate 1/2 sum F e^2 of the KL each format's actual error on the calibration K/V adds "
              "(summed over a window's tokens, mean over windows); analysis.fisher names the axes. A ranking for "
              "--objective fisher (docs/design.md 3.1), in no bound; scaled by fisher_output_ratio",
    "fisher_output_ratio": "(layers, kv_heads, 2 [K, V], formats) MEASURED ratio of the diagonal Fisher of the attention "
                           "output (each format's actual output change, on a subset of the queries) to the diagonal "
                           "over the cached entries, which scales that format's fisher prices; 1 for formats of more "
                           "than 4 bits",
    "fisher_key_tv": "(layers, kv_heads, formats) MEASURED mean over a subset of the queries of the total variation between "
                     "the attention weights with exact keys and with every key in the format (largest over the KV head's "
                     "query heads); the fisher objective leaves out key formats above 1/2 (docs/design.md 3.1); 0 where "
                     "not measured (formats of more than 4 bits)",
    "fisher_joint_ratio": "(2 [K, V], formats) MEASURED ratio of the model's KL (first calibration window, summed over its "
                          "tokens) with every key (value) of every layer and head in the format from position 4 on, to "
                          "the sum of those units' fisher prices, which scales that format's prices (docs/design.md "
                          "3.1); 1 where not measured (formats of more than 4 bits)",
    "fisher_joint_kl": "(2 [K, V], formats) MEASURED that KL per token; the fisher objective leaves out formats above 1 "
                       "(docs/design.md 3.1); NaN where not measured"
}

__doc__ += "\n" + "\n".join(f"* ``{k}`` — {v}" for k, v in ARRAY_FIELDS.items())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("hnfverify", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def layer_summary(arrays: dict) -> list[dict]:
    import numpy as np

    rows = []
    n_layers = arrays["kappa_hi"].shape[0]
    for li in range(n_layers):
        kh = arrays["kappa_hi"][li]
        h, t = np.unravel_index(int(np.argmax(kh)), kh.shape)
        rows.append({
            "layer": li,
            "kappa_max": _f(kh.max()),
            "kappa_argmax": {"kv_head": int(h), "position": int(t)},
            "alpha_max": _f(arrays["alpha_max_hi"][li].max()),
            "qnorm_max": _f(arrays["qnorm_max_hi"][li].max()),
            "k_d_token": [_f(arrays["k_d_token"][li].min()), _f(arrays["k_d_token"][li].max())],
            "v_d_token": [_f(arrays["v_d_token"][li].min()), _f(arrays["v_d_token"][li].max())],
            "k_d_channel": [_f(arrays["k_d_channel"][li].min()), _f(arrays["k_d_channel"][li].max())],
            "lipschitz_measured": _f(arrays["lipschitz"][li]),
            **({"mlp_lipschitz_measured": _f(arrays["mlp_lipschitz"][li])} if "mlp_lipschitz" in arrays else {}),
            **({"suffix_measured": _f(arrays["suffix"][li])} if "suffix" in arrays else {}),
            "o_proj_norm_kvhead": [_f(x) for x in arrays["o_proj_norm_kvhead"][li]],
            "scaling": _f(arrays["scaling"][li]),
        })
    return rows


def build_summary(analysis, model_identity: dict, calib_identity: dict, arrays_name: str, arrays_sha: str) -> dict:
    from .curvature import DELTA, ETA

    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        # the fingerprint of the weights the analysis ran on (hnfverify.models.weights_sha256), whatever the caller passed
        "model": {**model_identity, **({"weights_sha256": analysis.meta["weights_sha256"]}
                                       if analysis.meta.get("weights_sha256") else {})},
        "calibration": calib_identity,
        "analysis": {
            **analysis.meta["options"],
            "attn_implementation": analysis.meta["attn_implementation"],
            "keys": "cached after RoPE, as the model caches them",
            "value_curvature": "0: the attention output is linear in each V_t, so values are limited by the "
                               "error budget (docs/design.md §2.4), not by Theorem 5.7",
            "enclosure": {"method": "float64 evaluation widened by the derived rounding bounds, at least relative "
                                    "DELTA and absolute ETA (docs/design.md §2.1a); each layer's largest kappa "
                                    "re-evaluated in interval arithmetic (§2.1b)",
                          "DELTA": repr(DELTA), "ETA": repr(ETA),
                          "encloses": "the exact max over calibration queries of each quantity, "
                                      "given the captured float32 q, K, V"},
            "witnesses": analysis.meta.get("witnesses"),
            "lipschitz": "MEASURED (not proved): Golub-Kahan-Lanczos on the Jacobian of each decoder block at "
                         "calibration hidden states; a lower bound of the block's local Lipschitz constant",
            "mlp_lipschitz": "MEASURED (not proved): the same estimate (per token) for the rest of each block after "
                             "its attention, attention output -> block output with the block input fixed, at the "
                             "calibration point (sequential, parallel, post-norm and sandwich layers; "
                             "docs/design.md 2.5a)",
        },
        "shape": analysis.meta["shape"],
        "rule_grid": analysis.meta["rule_grid"],
        "layers": layer_summary(analysis.arrays),
        "arrays": {"file": arrays_name, "sha256": arrays_sha, "fields": ARRAY_FIELDS},
        "timings_s": {k: round(v, 3) for k, v in analysis.timings.items()},
        **({"suffix": {"remainder": float(analysis.arrays["suffix_remainder"][0]),
                       "radius": float(analysis.arrays["suffix_radius"][0]),
                       "logit_gain": float(analysis.arrays["logit_gain"][0])}} if "suffix" in analysis.arrays else {}),
        "tool": _versions(),
    }


def arrays_path_for(json_path: str | Path) -> Path:
    p = Path(json_path)
    return p.with_name(p.stem + ".safetensors") if p.suffix == ".json" else p.with_name(p.name + ".safetensors")


def save(analysis, model_identity: dict, calib_identity: dict, out: str | Path) -> dict:
    """Write ``out`` (JSON) and its ``.safetensors`` sibling atomically. Returns the summary."""
    from safetensors.numpy import save_file

    from ..io import atomic_path, sha256_file, write_json_atomic

    out = Path(out)
    apath = arrays_path_for(out)
    with atomic_path(apath) as tmp:
        save_file(analysis.arrays, str(tmp), metadata={"kind": KIND, "schema_version": str(SCHEMA_VERSION)})
        sha = sha256_file(tmp)
    summary = build_summary(analysis, model_identity, calib_identity, apath.name, sha)
    write_json_atomic(out, summary)
    return summary


def load(path: str | Path) -> tuple[dict, dict]:
    """Load (summary, arrays) and check the arrays file's hash. Raises InputError on any problem."""
    from safetensors.numpy import load_file

    from ..io import sha256_file

    p = Path(path)
    if not p.is_file():
        raise InputError(f"report {str(p)!r}: no such file")
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"report {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(summary, dict) or summary.get("kind") != KIND:
        raise InputError(f"report {str(p)!r}: $.kind must be {KIND!r}")
    if summary.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"report {str(p)!r}: $.schema_version must be {SCHEMA_VERSION}, "
                         f"got {summary.get('schema_version')!r}")
    try:
        apath = p.with_name(summary["arrays"]["file"])
        want = summary["arrays"]["sha256"]
    except (KeyError, TypeError):
        raise InputError(f"report {str(p)!r}: $.arrays.file / $.arrays.sha256 missing") from None
    if not apath.is_file():
        raise InputError(f"report {str(p)!r}: arrays file {str(apath)!r} is missing")
    if sha256_file(apath) != want:
        raise InputError(f"report {str(p)!r}: arrays file {str(apath)!r} does not match $.arrays.sha256")
    return summary, load_file(str(apath))


def lookup(summary: dict, arrays: dict, layer: int, head: int, position: int) -> dict:
    """Every per-position field at (layer, kv head, position), plus the per-layer fields."""
    shape = summary["shape"]
    for name, val, lim in (("layer", layer, shape["layers"]), ("head", head, shape["kv_heads"]),
                           ("position", position, shape["positions"])):
        if not 0 <= val < lim:
            raise InvalidArgument(f"--{name} must be in [0, {lim - 1}], got {val}")
    g = summary["analysis"]["channel_group"]
    out = {"layer": layer, "kv_head": head, "position": position}
    for name, a in sorted(arrays.items()):
        if name.startswith(("kappa_far", "kappa_near")):
            out[name] = [float(x) for x in a[layer, :, head, position]]
        elif name.startswith("mass_") or name == "fisher":
            continue
        elif name.startswith("fisher_"):        # per (layer, kv head) over the formats, or whole-model per K/V
            part = a[layer, head] if a.shape[:2] == (shape["layers"], shape["kv_heads"]) else a
            out[name] = [[None if x != x else float(x) for x in row] for row in part.reshape(-1, part.shape[-1])]
        elif a.ndim == 3:
            out[name] = a[layer, head, position].item()
        elif a.ndim == 4:
            out[name] = [float(x) for x in a[layer, head, position // g]]
        elif a.ndim == 2:
            out[name] = a[layer].tolist()
        elif a.ndim == 1 and a.shape[0] == shape["layers"]:
            out[name] = a[layer].item()
        elif a.ndim == 1:                       # whole-model scalars (suffix_remainder, logit_gain, ...)
            out[name] = [float(x) for x in a]
    return out
