"""``hnfverify certify-engine`` and ``export``: the KV-cache settings engines deploy (docs/design.md §2.3d).

An engine setting is a fixed plan: llama.cpp's ``-ctk/-ctv`` types hold every cached position of every layer and
head (no sink, no recent window: llama.cpp quantizes a position when it writes it); vLLM's ``--kv-cache-dtype
fp8_e4m3`` holds them in FP8 behind one float32 scale per layer's K or V (1.0 unless calibrated) or per KV head.
The plan records no error norms (an engine stores none), so its bits per element are the engine's own.
What is certified is hnfverify's model of the engine's *storage*; the engine's attention kernels (their own
precision, flash or paged attention) are not modelled.
"""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction
from typing import TextIO

from ..errors import EXIT_OK, EXIT_VIOLATED, InputError, InvalidArgument, PlanInfeasible
from .options import check_output_target, check_text, fraction_arg, quiet_transformers, set_threads

LLAMA_TYPES = ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "iq4_nl", "f16")
VLLM_DTYPES = ("fp8", "fp8_e4m3")


def _llama_format(t: str) -> str:
    return "fp16" if t == "f16" else t


def _scale_name(x) -> str:
    """A vLLM scale (a JSON number) -> its fp8_e4m3_s format name: the float32 value vLLM multiplies by, exactly."""
    import struct

    from ..core.formats import scaled_e4m3
    from ..core.formats.fp8 import float32_exact

    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 or x != x or x == float("inf"):
        raise InputError(f"--scales: a scale must be a positive finite number, got {x!r}")
    f = Fraction(struct.unpack("<f", struct.pack("<f", float(x)))[0])
    if not float32_exact(f):
        raise InputError(f"--scales: scale {x!r} is not a normal float32 value")
    return scaled_e4m3(f).name


def load_scales(path: str, n_layers: int, n_kv: int) -> dict:
    """``--scales FILE``: {"k_scale": S, "v_scale": S}, S a number (every layer), a list of one number per layer, or
    a list per layer of one number per KV head; or vLLM's own ``--quantization-param-path`` file
    ({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"<layer>": s}}}}: one scale per layer for
    K and V, tensor-parallel rank 0) -> {(layer, head, "K"|"V"): format name}."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as e:
        raise InputError(f"--scales {path}: cannot read it: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--scales {path}: not JSON: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("kv_cache"), dict):
        kc = doc["kv_cache"]
        ranks = kc.get("scaling_factor")
        if kc.get("dtype") != "float8_e4m3fn" or not isinstance(ranks, dict) or not isinstance(ranks.get("0"), dict):
            raise InputError(f"--scales {path}: a vLLM quantization-param file needs kv_cache.dtype float8_e4m3fn and "
                             "kv_cache.scaling_factor[\"0\"] (rank 0: layer -> scale)")
        per = ranks["0"]
        if sorted(per, key=lambda k: (len(k), k)) != [str(i) for i in range(n_layers)]:
            raise InputError(f"--scales {path}: scaling_factor[\"0\"] must have the layers 0..{n_layers - 1}")
        doc = {"k_scale": [per[str(i)] for i in range(n_layers)], "v_scale": [per[str(i)] for i in range(n_layers)]}
    if not isinstance(doc, dict) or not {"k_scale", "v_scale"} <= set(doc):
        raise InputError(f"--scales {path}: expected an object with k_scale and v_scale (or vLLM's kv_cache file)")
    out = {}
    for kv, key in (("K", "k_scale"), ("V", "v_scale")):
        s = doc[key]
        per_layer = [s] * n_layers if not isinstance(s, list) else s
        if len(per_layer) != n_layers:
            raise InputError(f"--scales {path}: {key} has {len(per_layer)} entries for {n_layers} layers")
        for li, v in enumerate(per_layer):
            heads = [v] * n_kv if not isinstance(v, list) else v
            if len(heads) != n_kv:
                raise InputError(f"--scales {path}: {key}[{li}] has {len(heads)} entries for {n_kv} KV heads")
            for h, x in enumerate(heads):
                out[(li, h, kv)] = _scale_name(x)
    return out


def vllm_scales(summary: dict, arrays: dict) -> dict:
    """Per-layer K and V scales for vLLM's fp8_e4m3 cache from an analysis: the power of two at or above amax / 448
    (amax over the layer's KV heads and calibration positions), so 448 s covers what calibration saw with up to 2x
    headroom and x / s, fp8 * s are exact scalings. {"k_scale": [...], "v_scale": [...]}, as ``--scales`` reads."""
    import math

    import numpy as np

    out = {}
    for kv in ("k", "v"):
        amax = np.maximum(np.abs(arrays[f"{kv}_tok_min"]), np.abs(arrays[f"{kv}_tok_max"])).reshape(
            summary["shape"]["layers"], -1).max(-1)
        out[f"{kv}_scale"] = [2.0 ** math.ceil(math.log2(max(float(a), 2.0 ** -100) / 448)) for a in amax]
    return out


def engine_request(args, shape: dict):
    """The PlanRequest an engine setting implies, and a one-line description of the setting."""
    from ..core.semantics import SEGMENTS
    from ..planning import PlanRequest

    common = dict(eps=fraction_arg("--eps", args.eps), max_kl=fraction_arg("--max-kl", args.max_kl), sink=0, recent=0,
                  c=Fraction(4), lipschitz_margin=Fraction(11, 10), suffix_margin=Fraction(2), error_norms=False,
                  max_seq_len=args.max_seq_len)
    if args.engine == "llama.cpp":
        if args.ctk is None or args.ctv is None:
            raise InvalidArgument("--engine llama.cpp needs --ctk and --ctv (the -ctk / -ctv cache types, e.g. q8_0)")
        if args.kv_cache_dtype is not None or args.scales is not None:
            raise InvalidArgument("--kv-cache-dtype and --scales are vLLM's; llama.cpp takes --ctk and --ctv")
        uniform = f"K={_llama_format(args.ctk)},V={_llama_format(args.ctv)}"
        return PlanRequest(uniform=uniform, **common), f"llama.cpp -ctk {args.ctk} -ctv {args.ctv}"
    if args.ctk is not None or args.ctv is not None:
        raise InvalidArgument("--ctk and --ctv are llama.cpp's; vLLM takes --kv-cache-dtype fp8_e4m3 [--scales FILE]")
    if args.kv_cache_dtype not in VLLM_DTYPES:
        raise InvalidArgument(f"--engine vllm needs --kv-cache-dtype {' or '.join(VLLM_DTYPES)}")
    n_l, n_kv = shape["layers"], shape["kv_heads"]
    names = load_scales(args.scales, n_l, n_kv) if args.scales else \
        {(li, h, kv): _scale_name(1.0) for li in range(n_l) for h in range(n_kv) for kv in "KV"}
    assign = tuple((li, h, kv, seg, names[(li, h, kv)]) for (li, h, kv) in sorted(names) for seg in SEGMENTS)
    how = f"scales from {args.scales}" if args.scales else "scale 1.0 (uncalibrated)"
    return PlanRequest(assign=assign, **common), f"vLLM --kv-cache-dtype {args.kv_cache_dtype}, {how}"


def cmd_certify_engine(args, out: TextIO, err: TextIO) -> int:
    from ..analysis.report import load
    from ..core.plan import save_plan
    from ..core.verify import PROVED, Verdict, certificate, outputs
    from ..core.verify.obligations import CheckOptions, check_plan
    from ..planning.planner import plan_with_estimate

    check_output_target("--out-dir", args.out_dir, directory=True, example="a directory for the plan and certificate")
    texts = args.text or ["prose", "code"]
    for t in texts:
        check_text(t)
    summary, arrays = load(args.report)
    req, setting = engine_request(args, summary["shape"])
    req.validate()
    try:
        plan, _ = plan_with_estimate(summary, arrays, req, os.path.basename(args.report))
    except PlanInfeasible as e:             # e.g. an FP8 scale that clips this model's keys: the setting is not safe
        print(f"setting      {setting}\nhnfverify certify-engine: NOT SAFE: {e}", file=out)
        return EXIT_VIOLATED
    os.makedirs(args.out_dir, exist_ok=True)
    plan_path = os.path.join(args.out_dir, "plan.json")
    sha = save_plan(plan, plan_path)
    opts = CheckOptions(max_kl=req.max_kl)
    result = check_plan(plan, opts)
    verdict = result.verdict()
    cert_path = None
    if verdict == PROVED:
        cert_path = certificate.write(certificate.build(plan, sha, plan_path, result, opts),
                                      os.path.join(args.out_dir, "certs"))
    claims = plan["claims"]
    summary_row = {"setting": setting, "plan": plan_path, "sha256": sha, "verdict": verdict, "certificate": cert_path,
                   "bits_per_element": claims["avg_bits"], "attention_error_max": max(
                       (Fraction(x) for x in claims["attention_error_max"] if x is not None), default=None),
                   "end_to_end_bound": claims.get("end_to_end_bound")}
    rows = []
    if not args.no_eval:
        set_threads(args.threads)
        quiet_transformers()
        from ..evaluation import evaluate
        from ..models import check_plan_matches_model, load_model

        lm = load_model(args.model, verbose=False)
        check_plan_matches_model(plan, lm.model)
        rows = [evaluate(lm, plan, t, windows=args.windows, prefix=args.prefix, scored=args.scored) for t in texts]
    if args.format == "json":
        doc = dict(summary_row, attention_error_max=None if summary_row["attention_error_max"] is None else
                   str(summary_row["attention_error_max"]), eval=rows)
        out.write(json.dumps(doc, sort_keys=True, default=str) + "\n")
    else:
        out.write(f"setting      {setting}\n")
        out.write(f"plan         {plan_path} (sha256 {sha[:16]}): {claims['avg_bits']} bits per element, every position "
                  "in the engine's format\n")
        out.write(outputs.text(result, plan_path, sha, cert_path).splitlines()[-1 if cert_path is None else -2] + "\n")
        if cert_path:
            out.write(f"certificate  {cert_path}\n")
        if rows:
            from .render import print_eval

            print_eval(rows, plan, out)
        out.write("scope        the certificate covers hnfverify's bit-exact model of the engine's KV storage; the "
                  "engine's own attention kernels (precision, flash/paged attention) are not modelled\n")
    bad = sum(r["bound_violations"] + r["end_to_end_violations"] for r in rows)
    if bad:
        print(f"hnfverify certify-engine: {bad} CERTIFIED BOUND(S) EXCEEDED", file=err)
        return EXIT_VIOLATED
    return Verdict(verdict).exit_code if verdict != PROVED else EXIT_OK


def cmd_export(args, out: TextIO, err: TextIO) -> int:
    """The cheapest engine setting whose certified bounds are within the plan's: per layer the attention-output bound
    no larger than the plan's, and the end-to-end bound no larger where the plan has a finite one."""
    from ..analysis.report import load
    from ..core.plan import claim_float, load_plan
    from ..core.formats import by_name
    from ..planning.planner import plan_with_estimate

    plan = load_plan(args.plan)
    summary, arrays = load(args.report)
    if summary["model"]["config_sha256"] != plan["model"]["config_sha256"]:
        raise InvalidArgument(f"--report {args.report} analyses another model than the plan's "
                              f"({summary['model']['name']} vs {plan['model']['name']})")
    mine = [claim_float(x) for x in plan["claims"]["layer_bounds"]]
    e2e = claim_float(plan["claims"]["end_to_end_bound"])
    e2e = e2e if e2e is not None and math.isfinite(e2e) else None
    bits = float(Fraction(plan["claims"]["avg_bits"]))
    if args.to == "vllm":
        scales = vllm_scales(summary, arrays)
        target = args.out or "kv_scales.json"
        from ..io import write_bytes_atomic

        # vLLM's quantization-param schema (KVCacheQuantSchema): one scale per layer for K and V, per TP rank
        arch = str(summary["model"].get("architecture", ""))
        doc = {"model_type": arch.replace("ForCausalLM", "").lower(),
               "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {
                   str(li): max(k, v) for li, (k, v) in enumerate(zip(scales["k_scale"], scales["v_scale"]))}}}}
        write_bytes_atomic(target, (json.dumps(doc, indent=1) + "\n").encode())
        ns = argparse_ns(engine="vllm", kv_cache_dtype="fp8_e4m3", scales=target)
        req, setting = engine_request(ns, summary["shape"])
        eng, _ = plan_with_estimate(summary, arrays, req, os.path.basename(args.report))
        out.write(f"vllm         --kv-cache-dtype fp8_e4m3 --quantization-param-path {target} (vLLM's schema: per layer "
                  "one scale for K and V, the power of two at or above amax / 448 of the calibration analysis; "
                  "certify-engine --scales reads it)\n")
        _compare(out, eng, mine, e2e, bits)
        return EXIT_OK
    cands = sorted((by_name(_llama_format(k)).bits_per_element + by_name(_llama_format(v)).bits_per_element, k, v)
                   for k in LLAMA_TYPES for v in LLAMA_TYPES)
    for _, k, v in cands:
        req, setting = engine_request(argparse_ns(engine="llama.cpp", ctk=k, ctv=v), summary["shape"])
        try:
            eng, _ = plan_with_estimate(summary, arrays, req, os.path.basename(args.report))
        except PlanInfeasible:
            continue
        lb = [claim_float(x) for x in eng["claims"]["layer_bounds"]]
        ee = claim_float(eng["claims"]["end_to_end_bound"])
        ee = ee if ee is not None and math.isfinite(ee) else None
        if all(a <= b for a, b in zip(lb, mine)) and (e2e is None or (ee is not None and ee <= e2e)):
            out.write(f"llama.cpp    -ctk {k} -ctv {v}{' -fa on' if v != 'f16' else ''}  (the cheapest pair whose "
                      "certified per-layer attention bounds are within the plan's"
                      f"{' and end-to-end bound too' if e2e is not None else ''}; a quantized V cache needs flash "
                      "attention)\n")
            _compare(out, eng, mine, e2e, bits)
            return EXIT_OK
    out.write("llama.cpp    no -ctk/-ctv pair certifies within the plan's bounds: keep the plan's cache (or f16)\n")
    return EXIT_VIOLATED


def argparse_ns(**kw):
    from argparse import Namespace

    base = dict(eps=None, max_kl=None, max_seq_len=None, kv_cache_dtype=None, scales=None, ctk=None, ctv=None)
    return Namespace(**dict(base, **kw))


def _compare(out: TextIO, eng: dict, mine: list, e2e, bits: float) -> None:
    from ..core.plan import claim_float

    eb = float(Fraction(eng["claims"]["avg_bits"]))
    lb = [claim_float(x) for x in eng["claims"]["layer_bounds"]]
    worst = max(lb)
    within = all(a <= b for a, b in zip(lb, mine))
    out.write(f"vs the plan  {eb:.4g} bits per element vs the mixed plan's {bits:.4g} ({eb - bits:+.4g}: one type for "
              f"every layer and head, no sink or recent window); largest per-layer attention bound {worst:.4g} vs "
              f"{max(mine):.4g}; every layer within the plan's bound: {'yes' if within else 'NO'}\n")
