"""Independent recomputation of q, K, V from a model's own weights (not via instrumentation)."""

import sys

import torch


def independent_qkv(model, input_ids, layer):
    """Post-RoPE q (Hq,T,d), K and V (Hkv,T,d) of ``layer`` for a Llama/Qwen2/Mistral-style model,
    recomputed from the layer's input hidden states and its projection weights."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        h = out.hidden_states[layer]
        blk = model.model.layers[layer]
        attn = blk.self_attn
        x = blk.input_layernorm(h)
        d = attn.head_dim
        t = input_ids.shape[1]
        q = attn.q_proj(x).view(1, t, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, t, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(1, t, -1, d).transpose(1, 2)
        pos = torch.arange(t)[None]
        cos, sin = model.model.rotary_emb(x, pos)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, cos, sin)
    return q[0], k[0], v[0], float(attn.scaling)


def naive_kappa(q, k, v, tau, t, sliding_window=None):
    """max over query heads of the group and queries i >= t of the closed-form kappa_t (float64 loops)."""
    hq, tl, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    out = []
    for h in range(hkv):
        best = 0.0
        kk, vv = k[h].double(), v[h].double()
        for gi in range(g):
            for i in range(t, tl):
                if sliding_window is not None and i - t >= sliding_window:
                    continue
                lo_j = 0 if sliding_window is None else max(0, i - sliding_window + 1)
                qq = q[h * g + gi, i].double()
                s = tau * (kk[lo_j:i + 1] @ qq)
                a = torch.softmax(s, 0)
                o = a @ vv[lo_j:i + 1]
                at = a[t - lo_j]
                val = 0.5 * tau ** 2 * float(qq @ qq) * float(at) * abs(1 - 2 * float(at)) * float((vv[t] - o).norm())
                best = max(best, val)
        out.append(best)
    return out


def tiny_report(lm, windows: int = 2, window: int = 64, seed: int = 5, **options):
    """(summary, arrays) of an analysis of ``lm`` on random token windows (in memory, no report file).
    ``options``: AnalysisOptions fields (default: a cheap Lipschitz estimate, no Fisher pass)."""
    from hnfverify.analysis.analyzer import AnalysisOptions, analyze
    from hnfverify.texts import TokenWindows

    ids = torch.randint(0, 256, (windows, window), generator=torch.Generator().manual_seed(seed)).tolist()
    wins = TokenWindows("random", "file", ids, 1)
    # the Fisher pass only where a test asks for it (fisher_tokens=...): the planner's objective is its subject
    res = analyze(lm, wins, AnalysisOptions(**{"lipschitz_iters": 2, "lipschitz_tokens": 8, "fisher_tokens": 0,
                                               **options}))
    summary = {"shape": res.meta["shape"], "rule_grid": res.meta["rule_grid"], "analysis": {**res.meta["options"]},
               "calibration": wins.identity(), "model": {k: str(v) for k, v in lm.identity().items()},
               "arrays": {"sha256": "0" * 64}}
    summary["model"]["weights_sha256"] = res.meta["weights_sha256"]
    return summary, res.arrays


def tiny_plan(lm, request, windows: int = 2, window: int = 64, seed: int = 5, **options):
    """analyze ``lm`` on random token windows (``tiny_report``) and plan with ``request`` (a PlanRequest)."""
    from hnfverify.planning import plan_from_report

    summary, arrays = tiny_report(lm, windows, window, seed, **options)
    return plan_from_report(summary, arrays, request)


def decode_logits(model, cache, ids, prefix: int):
    """Prefill ids[:, :prefix] into ``cache``, then feed one token per step up to ids' last but one: the
    logits predicting positions prefix .. T-1 (T, V), as token-by-token decoding computes them."""
    t = ids.shape[1]
    out = model(input_ids=ids[:, :prefix], cache=cache, use_cache=True)
    dec = [out.logits[0, -1]]
    for i in range(prefix, t - 1):
        out = model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
        dec.append(out.logits[0, -1])
    return torch.stack(dec)


def recorded_decode_logits(model, plan, ids, prefix: int):
    """``decode_logits`` through a fresh MixedPrecisionCache of ``plan`` under run-time certification
    (``kv.certify.certify``), recording per layer and step the K/V the model gave ``update`` and the K/V it
    returned, and per attention call the real attention error — the output from what the cache returned minus
    the output on the exact K/V of the same pass, (B, Hq, n) — next to its certified run-time bound.
    Returns (logits, {layer: [(k_in, v_in, k_out, v_out)]}, [(layer, error, bound)])."""
    from hnfverify.kv.cache import MixedPrecisionCache
    from hnfverify.kv.certify import certify

    cache = MixedPrecisionCache.from_plan(plan, model)
    steps: dict = {}
    for li, layer in enumerate(cache.layers):
        def update(k, v, *args, _orig=layer.update, _li=li, **kw):
            out = _orig(k, v, *args, **kw)
            steps.setdefault(_li, []).append((k.detach().clone(), v.detach().clone(),
                                              out[0].detach().clone(), out[1].detach().clone()))
            return out
        layer.update = update
    calls = []

    def observe(li, query, key, value, bias, tau, bounds):
        g = query.shape[1] // key.shape[1]
        exact = [torch.cat([r[i] for r in steps[li]], 2) for i in (0, 1)]

        def out(k, v):
            k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
            return torch.softmax(tau * query.double() @ k.transpose(-1, -2) + bias.double(), -1) @ v

        calls.append((li, (out(key, value) - out(*exact)).norm(dim=-1), bounds))

    with certify(model, cache, observer=observe):
        logits = decode_logits(model, cache, ids, prefix)
    return logits, steps, calls


def assert_cache_reads_the_plan_forms(plan, steps: dict) -> int:
    """At every one-token step of ``recorded_decode_logits``, each (layer, KV head) stream the cache returned is
    exactly what the plan's one definition (``evaluation.attention.versions`` / ``selector``, docs/design.md §4)
    says a query at that step reads, computed from the K/V the model itself gave the cache. Returns the number of
    steps checked."""
    from hnfverify.evaluation.attention import plan_rules, selector, versions

    rules = plan_rules(plan)
    checked = 0
    for li, recs in steps.items():
        inputs = [torch.cat([r[i] for r in recs], 2)[0] for i in (0, 1)]          # (Hkv, T, d) K and V
        for step, rec in enumerate(recs[1:], 1):                                  # the one-token steps
            n = rec[2].shape[2]
            for h in range(inputs[0].shape[0]):
                for which in (0, 1):
                    rule = rules[(li, h)][which]
                    x = inputs[which][h, :n].float()
                    vers = versions(x, rule)
                    sel = selector(rule, n, n - 1)[n - 1]
                    want = torch.stack([vers[int(c)][t] for t, c in enumerate(sel.tolist())])
                    got = rec[2 + which][0, h].float()
                    assert torch.equal(got, want), (li, step, h, "KV"[which], float((got - want).abs().max()))
            checked += 1
    assert checked > 0
    return checked
