"""Text renderers: the analysis summary, the plan table, the evaluation table."""

from __future__ import annotations

from typing import TextIO



def print_analysis(summary: dict, out: TextIO, paths: tuple[str, str] | None = None) -> None:
    m, c, s = summary["model"], summary["calibration"], summary["shape"]
    a = summary["analysis"]
    print(f"model        {m['name']}: {m['architecture']}, {s['layers']} layers x {s['kv_heads']} KV heads "
          f"({s['query_heads']} query heads), head_dim {s['head_dim']}; config sha256 {m['config_sha256'][:16]}",
          file=out)
    print(f"calibration  {c['source']} [{c['split']} split]: {c['n_windows']} windows x {c['window']} tokens "
          f"= {c['n_tokens']} tokens from {c['n_documents']} documents; token ids sha256 {c['token_ids_sha256'][:16]}",
          file=out)
    print(f"curvature    {a['curvature']} (planning uses kappa_lo/hi); values: curvature 0 (linear in V_t); "
          f"Lipschitz: measured on {a['lipschitz_tokens']} tokens, {a['lipschitz_iters']} Lanczos steps", file=out)
    hdr = (f"{'layer':>5} {'kappa_max':>10} {'(h,t)':>9} {'alpha_max':>9} {'|q|max':>7} "
           f"{'D_K tok':>15} {'D_V tok':>15} {'Lip(meas)':>9} {'|W_o|':>6}")
    print(hdr, file=out)
    for r in summary["layers"]:
        am = r["kappa_argmax"]
        lip = r["lipschitz_measured"]
        print(f"{r['layer']:>5} {r['kappa_max']:>10.3e} {'(%d,%d)' % (am['kv_head'], am['position']):>9} "
              f"{r['alpha_max']:>9.4f} {r['qnorm_max']:>7.2f} "
              f"{r['k_d_token'][0]:>7.2f}-{r['k_d_token'][1]:<7.2f} {r['v_d_token'][0]:>7.2f}-{r['v_d_token'][1]:<7.2f} "
              f"{(lip if lip is not None else float('nan')):>9.3f} {max(r['o_proj_norm_kvhead']):>6.2f}", file=out)
    kmax = max(summary["layers"], key=lambda r: r["kappa_max"])
    print(f"max kappa {kmax['kappa_max']:.4e} at layer {kmax['layer']}, kv head {kmax['kappa_argmax']['kv_head']}, "
          f"position {kmax['kappa_argmax']['position']}", file=out)
    sfx, tm = a.get("suffix"), summary.get("timings_s", {})
    if sfx and "tokens" in sfx:
        sl = [r.get("suffix_measured") for r in summary["layers"]]
        print(f"suffix       MEASURED sensitivities S_l (attention output -> lm_head input, all positions; "
              f"docs/design.md 2.5) on {sfx['tokens']} tokens, {sfx['iterations']} Lanczos steps: "
              f"{min(sl):.3g}..{max(sl):.3g}; remainder K {summary['suffix']['remainder']:.3g} within radius "
              f"{summary['suffix']['radius']:.3g}; lm_head gain {summary['suffix']['logit_gain']:.3g}; the "
              f"measurement took {tm.get('suffix_s', float('nan')):.1f} s", file=out)
    elif sfx:
        print(f"suffix       not measured: {sfx['unsupported']} (plans compose by products)", file=out)
    if paths:
        print(f"wrote        {paths[0]} and {paths[1]} (arrays sha256 {summary['arrays']['sha256'][:16]})", file=out)


def print_plan(plan: dict, out: TextIO, sha: str, brief: bool = False) -> None:
    mode = plan["mode"]
    print(f"plan         {plan['model']['name']}: {plan['shape']['layers']} layers x {plan['shape']['kv_heads']} KV heads, "
          f"head_dim {plan['shape']['head_dim']}, max_seq_len {plan['max_seq_len']}; sha256 {sha}", file=out)
    tgt = plan["eps_target"] if plan["eps_target"] is not None else "none"
    print(f"request      mode {mode['kind']} {mode['value']}; eps {plan['eps']} ({plan['eps_source']}), "
          f"eps_target {tgt}, c {plan['c']}; sink {plan['rule']['sink']}, recent window {plan['rule']['recent']}; "
          f"curvature {plan['analysis']['curvature']}", file=out)
    segs = ("sink", "recent", "rest")
    if not brief:
        plan_table(plan, out, segs)
    plan_footer(plan, out, segs)


def plan_table(plan: dict, out: TextIO, segs) -> None:
    from fractions import Fraction

    from ..core.formats import by_name

    c = plan["claims"]
    print(f"{'layer':>5}  {'K formats (sink / recent / rest), per KV head':<58} {'V formats':<44} "
          f"{'bits':>6} {'E_attn':>9}", file=out)
    d = plan["shape"]["head_dim"]
    t = plan["max_seq_len"]
    fmts = {n: by_name(n) for n in plan["formats"]}

    def short(n):
        return n.replace("fp8_", "").replace("_t" + str(d), "t").replace("_c", "c")

    from ..core.semantics import StreamRule, segment_bits, stored_counts

    for li, layer in enumerate(plan["layers"]):
        kcol, vcol, bits, n = [], [], Fraction(0), 0
        for h in layer["heads"]:
            for kv, col in (("K", kcol), ("V", vcol)):
                r = h[kv]
                col.append("/".join(short(r[s]["format"]) for s in segs))
                rule = StreamRule(r["sink"]["length"], r["recent"]["length"],
                                  {s: fmts[r[s]["format"]] for s in ("sink", "recent", "rest")})
                counts = stored_counts(rule, t)          # the accounting of docs/design.md §4
                bits += sum(segment_bits(rule.formats[s], s, counts, 1) for s in ("sink", "recent", "rest"))
                n += t
        print(f"{li:>5}  {' '.join(kcol):<58} {' '.join(vcol):<44} {float(bits / n):>6.2f} "
              f"{claim_at(c['attention_error_max'], li):>9}", file=out)


def claim_at(values, i: int) -> str:
    """One per-layer claim for the table; "n/a" where the plan's claims list has no entry."""
    from ..core.plan import claim_float

    if not isinstance(values, list) or not 0 <= i < len(values):
        return "n/a"
    return f"{claim_float(values[i]):.3g}"


def plan_footer(plan: dict, out: TextIO, segs) -> None:
    from collections import Counter

    from ..core.numbers import parse_number

    from ..core.plan import claim_float

    c = plan["claims"]
    use = Counter(h[kv][s]["format"] for layer in plan["layers"] for h in layer["heads"] for kv in "KV" for s in segs)
    print("formats used " + ", ".join(f"{k} x{v}" for k, v in sorted(use.items())), file=out)
    amp = parse_number("1")
    for layer in plan["layers"][1:]:
        amp *= parse_number(layer["lipschitz"]["value"])
    print(f"avg bits     {float(parse_number(c['avg_bits'])):.4f} per element (scales and zero-points included); "
          f"compression vs FP16 {float(parse_number(c['compression_vs_fp16'])):.3f}x; cache at max_seq_len "
          f"{float(parse_number(c['cache_bits_at_max_seq_len'])) / 8 / 1024:.1f} KiB", file=out)
    errs = [claim_float(x) for x in c["attention_error_max"]]
    comp = plan["composition"]
    if comp["form"] == "suffix":
        how = (f"suffix form: lm_head input, Frobenius over {plan['max_seq_len']} tokens; radius "
               f"{float(parse_number(comp['remainder']['radius'])):.3g}")
    else:
        how = f"product form: block Lipschitz product over layers 1..{len(plan['layers']) - 1}: {float(amp):.3g}"
    print(f"bounds       max attention-output error {f'{max(errs):.4g}' if errs else 'n/a'}"
          f"; end-to-end {_claim(c['end_to_end_bound'])} ({how}); Theorem 5.7 violations: "
          f"{c['theorem_5_7_violations']}", file=out)
    if comp["form"] == "suffix":
        print(f"output       per token: logit oscillation <= {_claim(c['logit_bound'])}, KL (both ways) <= "
              f"{_claim(c['kl_bound'])}" + (f"; max_kl {plan['max_kl']}" if plan["max_kl"] is not None else ""),
              file=out)


def print_eval(rows: list, plan: dict, out: TextIO) -> None:
    print(f"evaluation of {plan['model']['name']} with plan mode {plan['mode']['kind']} {plan['mode']['value']} "
          f"(eval split; reference = the same model's full-precision cache)", file=out)
    print(f"{'text':6} {'windows':>7} {'scored':>6} {'PPL ref':>8} {'PPL plan':>8} {'dPPL %':>7} {'KLD':>8} "
          f"{'top-1':>6} {'bits/el':>7} {'vs FP16':>7} {'cache KiB':>9} {'s/token':>7} {'viol.':>5} "
          f"{'bound/actual med':>16} {'min':>7} {'run-time med':>12} {'min':>7}", file=out)
    for r in rows:
        d = 100 * (r["ppl"] / r["ppl_ref"] - 1)
        med = r["bound_over_actual_median"]
        mn = r["bound_over_actual_min"]
        rmed, rmn = r.get("runtime_bound_over_actual_median"), r.get("runtime_bound_over_actual_min")
        print(f"{r['corpus']:6} {r['windows']:>7} {r['tokens_scored']:>6} {r['ppl_ref']:>8.3f} {r['ppl']:>8.3f} "
              f"{d:>+7.2f} {r['kld']:>8.5f} {r['top1']:>6.3f} {r['bits_per_element']:>7.3f} {r['compression']:>6.2f}x "
              f"{r['cache_bytes'] / 1024:>9.1f} {r['seconds_per_scored_token']:>7.4f} "
              f"{r['bound_violations'] + r['end_to_end_violations'] + (r.get('runtime_bound_violations') or 0):>5} "
              f"{(f'{med:.3g}' if med else '-'):>16} {(f'{mn:.3g}' if mn else '-'):>7} "
              f"{(f'{rmed:.3g}' if rmed else '-'):>12} {(f'{rmn:.3g}' if rmn else '-'):>7}", file=out)
    for r in rows:
        print(f"soundness    {r['corpus']}: {r['attention_outputs_checked']} attention outputs checked against the "
              f"certified per-head bound, {r['bound_violations']} exceeded it; log10(bound/actual) histogram "
              f"{r['bound_over_actual_log10_histogram']}; end-to-end ({r.get('end_to_end_form', 'product')} form) bound "
              f"{_g(r['end_to_end_bound'])} vs actual: median ratio {_g(r['end_to_end_bound_over_actual_median'])}, "
              f"{r['end_to_end_violations']} exceeded", file=out)
        o = r.get("output")
        if o:
            print(f"output       {r['corpus']}: {o['tokens']} tokens; plan-time logit-oscillation bound "
                  f"{_g(o['logit_bound'])} (bound/actual median {_g(o['logit_bound_over_actual_median'])}, "
                  f"{o['logit_bound_violations']} exceeded), KL bound {_g(o['kl_bound'])} (median "
                  f"{_g(o['kl_bound_over_actual_median'])}, {o['kl_bound_violations']} exceeded), greedy certified "
                  f"{o['greedy_certified']} ({_g(o['greedy_certified_fraction'])}), "
                  f"{o['greedy_certified_but_changed']} certified but changed; {o['greedy_changed']} changed", file=out)
            if "runtime_logit_bound_over_actual_median" in o:
                print(f"output       {r['corpus']} run-time: logit-oscillation bound median "
                      f"{_g(o['runtime_logit_bound_median'])} (bound/actual median "
                      f"{_g(o['runtime_logit_bound_over_actual_median'])}, min "
                      f"{_g(o['runtime_logit_bound_over_actual_min'])}, {o['runtime_logit_bound_violations']} exceeded, "
                      f"{o['runtime_tokens_outside_radius']} outside the radius), KL bound/actual median "
                      f"{_g(o['runtime_kl_bound_over_actual_median'])} ({o['runtime_kl_bound_violations']} exceeded), "
                      f"greedy certified {o['runtime_greedy_certified']} "
                      f"({_g(o['runtime_greedy_certified_fraction'])}), {o['runtime_greedy_certified_but_changed']} "
                      "certified but changed", file=out)
            print(f"assumptions  {r['corpus']}: suffix sensitivities and remainder with the actual injected errors: "
                  f"actual/predicted max {o['suffix_assumption_actual_over_predicted_max']}, "
                  f"{o['suffix_assumption_violations']} of {o['suffix_assumption_windows']} windows violate them; "
                  f"{o['suffix_assumption_windows_outside_radius']} windows' errors outside the radius", file=out)
        if r.get("runtime_bound_violations") is not None:
            print(f"run-time     {r['corpus']}: {r['runtime_attention_outputs_checked']} attention outputs checked "
                  f"against the run-time bound (docs/design.md §2.4b), {r['runtime_bound_violations']} exceeded it; "
                  f"bound/actual median {_g(r['runtime_bound_over_actual_median'])}, p10 "
                  f"{_g(r['runtime_bound_over_actual_p10'])}, min {_g(r['runtime_bound_over_actual_min'])}, max "
                  f"{_g(r['runtime_bound_over_actual_max'])}; plan-time p10 {_g(r['bound_over_actual_p10'])}, max "
                  f"{_g(r['bound_over_actual_max'])}", file=out)


def _claim(x) -> str:
    """A claimed bound; null (above 1e300, or no claim: outside the remainder's radius) as "none"."""
    from ..core.plan import claim_float

    return "none (no finite bound)" if x is None else f"{claim_float(x):.4g}"


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"
