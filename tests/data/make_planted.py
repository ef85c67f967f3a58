"""Generate the planted-violation corpus: plans that each violate exactly one obligation by the
smallest margin, with a manifest of where. `hnfverify check` must REFUTE every one (exit 1) and
name the spot (tests/core/verify/test_planted.py). Deterministic: `python tests/data/make_planted.py` rewrites
tests/data/planted/ byte for byte.

Kinds (each at a random layer, KV head and segment/position):
  one-step      a key segment stored one format cheaper than the cheapest admissible one, its
                curvature set exactly on the admissible format's Theorem 5.7 boundary
  one-ulp       a one-position block whose c·kappa·D²·u exceeds eps by a factor 1 + 2^-60
  composition   eps_target one unit in the last place of the exact end-to-end bound below it (suffix form,
                and product-composition-* for the product form)
  kl-over       max_kl one part in 2^60 below the exact KL bound (docs/design.md §2.6)
  kl-at         (control, must be PROVED) max_kl exactly the KL bound
  boundary      (control, must be PROVED) a one-position block exactly on the bound
  attention-over  keys' kappa 0 (every precision obligation holds), eps one part in 2^60 below the largest
                per-head bound E_h (docs/design.md §2.4): that head's attention budget is REFUTED
  attention-at  (control, must be PROVED) as attention-over with eps exactly the largest E_h
"""

from __future__ import annotations

import copy
import json
import random
import sys
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from hnfverify.core.formats import by_name  # noqa: E402
from hnfverify.core.planview import segment_stats  # noqa: E402
from hnfverify.core.verify.obligations import precision_terms  # noqa: E402
from hnfverify.core.numbers import fmt_number  # noqa: E402
from hnfverify.core.plan import dumps  # noqa: E402


def synthetic_report(seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n_l, n_h, g, d, w = 3, 2, 2, 16, 64
    sinks, windows = [0, 1, 4], [0, 8, 16]

    def pos(*shape, lo=0.0, hi=1.0):
        return rng.uniform(lo, hi, size=shape)

    kap = pos(n_l, n_h, w, hi=0.5)
    far = np.minimum(pos(n_l, 3, n_h, w, hi=0.5), kap[:, None])
    far[:, 0] = kap
    near = np.minimum(pos(n_l, 3, n_h, w, hi=0.5), kap[:, None])
    near[:, 0] = 0
    a = {"kappa_exact_lo": kap * 0.99, "kappa_exact_hi": kap, "kappa_lo": kap * 0.99, "kappa_hi": kap,
         "kappa_seed": kap, "kappa_far_lo": far * 0.99, "kappa_far_hi": far, "kappa_near_lo": near * 0.99,
         "kappa_near_hi": near, "alpha_max_hi": pos(n_l, n_h, w), "qnorm_max_hi": pos(n_l, n_h, w, lo=1, hi=4),
         "vo_max_hi": pos(n_l, n_h, w, hi=2), "mass_alpha_hi": pos(n_l, 3, 3, 3, n_h),
         "mass_avo_hi": pos(n_l, 3, 3, 3, n_h, hi=2), "o_proj_norm_kvhead": pos(n_l, n_h, lo=1, hi=2),
         "lipschitz": pos(n_l, lo=1, hi=1.5), "scaling": np.full(n_l, d ** -0.5)}
    a["mlp_lipschitz"] = np.linspace(1.0, 1.2, n_l)          # drawn after the rest: the other arrays are unchanged
    # the suffix composition (docs/design.md §2.5): S_l, K, rho, Gamma — fixed, not drawn
    a["suffix"] = np.linspace(2.0, 1.0, n_l)
    a["suffix_remainder"], a["suffix_radius"], a["logit_gain"] = np.array([0.5]), np.array([1e6]), np.array([3.0])
    for f in ("alpha_max", "qnorm_max", "vo_max", "mass_alpha", "mass_avo"):
        a[f + "_lo"] = a[f + "_hi"] * 0.9
    for kv in "kv":
        lo, hi = -pos(n_l, n_h, w, lo=0.5, hi=3), pos(n_l, n_h, w, lo=0.5, hi=3)
        a[f"{kv}_tok_min"], a[f"{kv}_tok_max"] = lo.astype("float32"), hi.astype("float32")
        a[f"{kv}_d_token"] = (hi - lo) * d ** 0.5
        a[f"{kv}_d_channel"] = (hi - lo) * d ** 0.5 * 0.5
    summary = {"shape": {"layers": n_l, "kv_heads": n_h, "query_heads": n_h * g, "head_dim": d, "positions": w},
               "rule_grid": {"sinks": sinks, "windows": windows},
               "analysis": {"curvature": "exact", "channel_group": 8, "lipschitz_tokens": 8, "lipschitz_iters": 4},
               "calibration": {"token_ids_sha256": "0" * 64, "n_windows": 1, "n_tokens": w},
               "model": {"name": "planted", "config_sha256": "0" * 64}, "arrays": {"sha256": "0" * 64}}
    return summary, a


def base_plan(composition=None):
    from hnfverify.planning import PlanRequest, plan_from_report
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    summary, arrays = synthetic_report()
    plan = plan_from_report(summary, arrays, PlanRequest(eps=Fraction(50), sink=4, recent=8, composition=composition))
    e_l = check_plan(plan, CheckOptions(smt=False)).end_to_end_bound
    plan["eps_target"] = fmt_number(e_l * 2)
    return plan


def planted(n_each: int = 6, seed: int = 7):
    from hnfverify.core.verify.obligations import CheckOptions, check_plan

    rng = random.Random(seed)
    base = base_plan()
    eps, c, t = Fraction(base["eps"]), Fraction(base["c"]), base["max_seq_len"]
    items = []
    d = base["shape"]["head_dim"]
    for i in range(n_each):                                   # one-step
        p = copy.deepcopy(base)
        li, h = rng.randrange(len(p["layers"])), rng.randrange(p["shape"]["kv_heads"])
        seg = "rest"            # the rest format is read in one stored form only (REST: recent, then rest)
        item = p["layers"][li]["heads"][h]["K"][seg]
        cur = by_name(item["format"])
        cheaper = [f for f in ("fp16", f"int8_t{d}", f"int4_t{d}", f"int2_t{d}") if by_name(f).bits_per_element <
                   cur.bits_per_element and by_name(f).granularity != "channel"]
        if cur.granularity == "channel":
            cheaper = [f"int{b}_c8" for b in (4, 2) if b < cur.value_bits]
        if not cheaper:
            continue
        new = by_name(cheaper[0])
        # kappa exactly admissible for the REST chain (recent, then cur): eps = c kappa sum u D^2
        rule = p["layers"][li]["heads"][h]["K"]
        chain = ((by_name(rule["recent"]["format"]),) if rule["recent"]["length"] else ()) + (cur,)
        stats = segment_stats(item["inputs"], d)
        _, rhs_at_kappa_1, _ = precision_terms(eps, c, chain, stats, Fraction(1))
        item["inputs"]["kappa"] = ["0", fmt_number(eps / rhs_at_kappa_1)]
        item["format"] = new.name
        p["formats"][new.name] = new.to_json()
        s_len = p["layers"][li]["heads"][h]["K"]["sink"]["length"]
        items.append((f"one-step-{i}", p, {"family": "precision-lower-bound", "layer": li, "kv_head": h,
                                             "kv": "K", "segment": seg, "position": s_len}))
    for i in range(n_each):                                   # one-ulp block, and its boundary control
        for kind, factor in (("one-ulp", 1 + Fraction(1, 2 ** 60)), ("boundary", Fraction(1))):
            p = copy.deepcopy(base)
            li, h = rng.randrange(len(p["layers"])), rng.randrange(p["shape"]["kv_heads"])
            rule = p["layers"][li]["heads"][h]["K"]
            pos = rng.randrange(rule["sink"]["length"], t)
            inputs = copy.deepcopy(rule["rest"]["inputs"])
            f = by_name(rule["recent"]["format"])          # the finest format the position already sees
            dd = Fraction(inputs["d_channel" if f.granularity == "channel" else "d_token"][1])
            inputs["kappa"] = ["0", fmt_number(eps * factor / (c * dd * dd * f.u))]
            rule["blocks"] = [{"start": pos, "end": pos + 1, "format": f.name, "inputs": inputs}]
            exp = ({"family": "precision-lower-bound", "layer": li, "kv_head": h, "kv": "K", "segment": "block0",
                    "position": pos} if kind == "one-ulp" else {"family": None})
            items.append((f"{kind}-{i}", p, exp))
    from hnfverify.core.bound import plan_bounds
    from hnfverify.core.planview import view

    for i in range(n_each // 2):                              # attention budget: just over / exactly on E_h
        p = copy.deepcopy(base)
        li = i % len(p["layers"])
        for layer in p["layers"]:
            for hd in layer["heads"]:
                for seg in ("sink", "recent", "rest"):
                    hd["K"][seg]["inputs"]["kappa"] = ["0", "0"]
                for b in hd["K"]["blocks"]:
                    b["inputs"]["kappa"] = ["0", "0"]
        # vary the head that carries the largest bound: scale one head's value spread up
        hd = p["layers"][li]["heads"][i % p["shape"]["kv_heads"]]
        for kv in "KV":
            for seg in ("sink", "recent", "rest"):
                if hd[kv][seg]["inputs"] is not None:
                    hd[kv][seg]["inputs"]["vo"][1] = fmt_number(Fraction(hd[kv][seg]["inputs"]["vo"][1]) * 4)
        n_l = len(p["layers"])
        p["claims"].update(layer_bounds=[None] * n_l, attention_error_max=[None] * n_l, end_to_end_bound=None,
                           logit_bound=None, kl_bound=None)
        errs = plan_bounds(view(p)).head_errors
        (top, e_max), = [max(errs.items(), key=lambda kv_: kv_[1])]
        assert sum(1 for e in errs.values() if e == e_max) == 1
        for kind, eps_h in (("attention-over", e_max * (1 - Fraction(1, 2 ** 60))), ("attention-at", e_max)):
            q = copy.deepcopy(p)
            q["eps"] = fmt_number(eps_h)
            exp = ({"family": "attention-error-budget", "layer": top[0], "kv_head": top[1]}
                   if kind == "attention-over" else {"family": None})
            items.append((f"{kind}-{i}", q, exp))
    for i in range(n_each // 2):                              # composition: one ulp below the exact bound
        p = copy.deepcopy(base)
        e_l = check_plan(p, CheckOptions(smt=False)).end_to_end_bound
        p["eps_target"] = fmt_number(Fraction(e_l.numerator - 1, e_l.denominator) if i % 2 == 0
                                     else e_l - Fraction(1, 10 ** 30))
        items.append((f"composition-{i}", p, {"family": "composition-law"}))
    prod = base_plan(composition="product")
    for i in range(2):                                        # the product form's composition law, as above
        p = copy.deepcopy(prod)
        e_l = check_plan(p, CheckOptions(smt=False)).end_to_end_bound
        p["eps_target"] = fmt_number(Fraction(e_l.numerator - 1, e_l.denominator) if i % 2 == 0
                                     else e_l - Fraction(1, 10 ** 30))
        items.append((f"product-composition-{i}", p, {"family": "composition-law"}))
    for i in range(2):                                        # the KL budget: just over / exactly on the bound
        p = copy.deepcopy(base)
        kl = plan_bounds(view(p)).kl
        for kind, mk in (("kl-over", kl * (1 - Fraction(1, 2 ** 60))), ("kl-at", kl)):
            q = copy.deepcopy(p)
            q["max_kl"] = fmt_number(mk)
            items.append((f"{kind}-{i}", q, {"family": "kl-budget"} if kind == "kl-over" else {"family": None}))
    return items


def main() -> int:
    out = HERE / "planted"
    out.mkdir(exist_ok=True)
    for f in out.glob("*.json"):
        f.unlink()
    manifest = []
    for name, plan, expect in planted():
        (out / f"{name}.json").write_bytes(dumps(plan))
        manifest.append({"file": f"{name}.json", "expect": expect})
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} planted plans to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
