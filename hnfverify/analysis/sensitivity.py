"""Measured sensitivity of the model's output to each cached key and value: a diagonal Fisher estimate,
per (layer, KV head, K|V, segment of the rule grid, format), that the planner's ``--objective fisher``
ranks its moves by (docs/design.md §3.1). It is a ranking, never part of a certificate.

For the KL divergence between the reference output distribution and the one with perturbed keys or
values, the gradient at the reference is 0 and the Hessian is the Fisher information, so to second order

    KL ~ 1/2 e^T F e,    F = E_{y ~ p} [g g^T],   g = d log p(y) / d (cached K, V),

and with the diagonal of F (as KVQuant weighs its codebooks) a format's cost on a segment is
1/2 sum_{t, i} F_{t,i} e_{t,i}^2, e = x - dequant(quant(x)) its actual error on the calibration K/V.
Labels are drawn from the model's own distribution at every position (so the products of the per-position
gradients have mean 0 and ``g^2`` of the summed gradient estimates the diagonal), with a seeded generator.

A key or value at position s is read by the queries i >= s, in its recent form while i - s < R and in its
rest form afterwards (docs/design.md §4); the two forms are different perturbations, so their gradients are
separated: the attention function below runs the model's attention (its mask and scaling; float32) and,
in backward, splits d scores and the value gradients by the distance i - s at every window R of the rule
grid. Positions are grouped in the intervals between the grid's sink lengths, so that any (S, R) of the
grid is priced by sums: sink = the intervals below S (whole gradient), recent / rest = the intervals from S
(the gradient of distances < R / >= R).
"""

from __future__ import annotations

from dataclasses import dataclass

from .curvature import SINKS, WINDOWS

REGIONS = ("sink", "recent", "rest")


@dataclass
class Sensitivity:
    """``cost``: float64 (layers, kv_heads, 2 [K, V], 3 [sink, recent, rest], windows, formats, intervals);
    ``formats``: the format names in that axis; ``intervals``: [lo, hi) of positions (hi None: to the end)."""

    cost: object
    formats: list
    intervals: list
    tokens: int
    windows: int
    labels: str
    ratio: object = None                # (layers, kv_heads, 2, formats): the output prices' ratio to the entries'
                                        # (1: not measured)
    key_tv: object = None               # (layers, kv_heads, formats): the keys' attention change (0: not measured)
    joint: object = None                # (2 [K, V], formats): measured whole-model KL / the summed prices (1: not
                                        # measured)
    joint_kl: object = None             # (2, formats): that KL per token (NaN: not measured)

    def meta(self) -> dict:
        return {"formats": list(self.formats), "intervals": [list(x) for x in self.intervals],
                "windows": list(WINDOWS), "tokens": self.tokens, "calibration_windows": self.windows,
                "labels": self.labels, "output_prices": {"formats_up_to_bits": NONLINEAR_BITS,
                                                         "queries_per_window": NONLINEAR_QUERIES},
                "joint": {"formats_up_to_bits": NONLINEAR_BITS, "sink": JOINT_SINK},
                "axes": ["layer", "kv_head", "K|V", "sink|recent|rest", "window R", "format", "position interval"]}


def intervals_of(t: int) -> list:
    """[lo, hi) position intervals between the grid's sink lengths, the last one open (hi None)."""
    cuts = [s for s in SINKS if 0 < s < t]
    lows = [0] + cuts
    return [[lo, hi] for lo, hi in zip(lows, cuts + [None])]


def _split_by_distance(w, x):
    """w: (H, T, T) weights of query i on position s (zero where i < s), x: (H, T, d) per query. Returns
    (windows, H, T, d): for each R of the grid, sum over queries i with i - s >= R of w[i, s] x[i] — the whole
    sum (R = 0) by one product, the near parts (i - s < R) along the band of diagonals below max R."""
    import torch

    total = w.transpose(-1, -2) @ x
    out = [total]
    near = torch.zeros_like(total)
    t = w.shape[-1]
    cuts = [r for r in WINDOWS if r > 0]
    for o in range(min(max(cuts, default=0), t)):
        near[:, :t - o] += torch.diagonal(w, offset=-o, dim1=-2, dim2=-1).unsqueeze(-1) * x[:, o:]
        if o + 1 in cuts:
            out.append(total - near)
    while len(out) < len(WINDOWS):          # windows longer than the text: nothing is that far
        out.append(torch.zeros_like(total))
    return torch.stack(out)


#: integer formats of at most this many value bits are priced at the attention output too (_output_prices)
NONLINEAR_BITS = 4
#: queries (evenly spaced) the output prices are measured on, per window
NONLINEAR_QUERIES = 256


#: the exact prefix of the joint measurement (the default plan's sink; a cut of the rule grid's intervals)
JOINT_SINK = 4


def _stored_attention(kv: int, fmt, sink: int):
    """The model's attention (its mask and scaling, float32) reading every key (kv = 0) or value (kv = 1)
    from position ``sink`` on in ``fmt`` (channel groups aligned at position 0, as the prices take them;
    None: exactly)."""
    import torch

    from .analyzer import attention_bias

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        hkv, d = key.shape[1], query.shape[-1]
        g = query.shape[1] // hkv
        tau = float(scaling if scaling is not None else getattr(module, "scaling", d ** -0.5))
        q, k, v = query.float(), key.float(), value.float()
        if fmt is not None:
            x = k if kv == 0 else v
            y = _roundtrip_all(x, fmt)
            y[..., :sink, :] = x[..., :sink, :]
            k, v = (y, v) if kv == 0 else (k, y)
        bias = attention_bias(attention_mask, query, key, module)
        a = torch.softmax(tau * (q @ k.repeat_interleave(g, dim=1).transpose(-1, -2)) + bias, dim=-1)
        out = a @ v.repeat_interleave(g, dim=1)
        return out.transpose(1, 2).contiguous().to(query.dtype), None

    return attn


def _joint_kl(model, ids, coarse: list, names: list, formats: dict) -> "np.ndarray":
    """(2, formats): sum over the window's tokens of KL(p || p~), p~ the model's output with every key (first)
    or every value (second) of every layer and head read in the format from position JOINT_SINK on; NaN for
    the formats not in ``coarse``."""
    import numpy as np
    import torch

    from .routing import routed_attention

    out = np.full((2, len(names)), np.nan)
    with torch.no_grad():
        with routed_attention(model, _stored_attention(0, None, JOINT_SINK), prefix="hnfverify_joint"):
            ref = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), -1)
        for kv in (0, 1):
            for fi in coarse:
                with routed_attention(model, _stored_attention(kv, formats[names[fi]], JOINT_SINK),
                                      prefix="hnfverify_joint"):
                    lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), -1)
                out[kv, fi] = float((ref.exp() * (ref - lp)).sum())
    return out


def _output_prices(rec: dict, kq, vq) -> tuple:
    """For one layer and format (kq, vq: its stored keys and values), per KV head: 1/2 sum_t sum_i G_ti^2 (o~ - o)_ti^2 over a subset of the queries,
    scaled to all of them, with o~ the attention output when every key (first) or every value (second) is
    stored in the format and G = d loss / d o: the diagonal Fisher of the attention *output*, which sees the
    actual output change — coherent errors that add up over positions and channels (a per-token range shrinks
    every key toward its mean, which moves every logit of a query the same way) as well as the softmax's
    nonlinearity — where the diagonal over the cached entries assumes they add up incoherently. Third: the
    keys' attention change, the mean over those queries of TV(alpha, alpha~), the largest over the query heads."""
    import torch

    k, v, q, bias, go, tau = rec["key"], rec["value"], rec["query"], rec["bias"], rec["dout"], rec["tau"]
    hkv, t, _ = k.shape
    g = q.shape[0] // hkv
    idx = torch.linspace(0, t - 1, min(t, NONLINEAR_QUERIES)).round().long().unique()
    scale = t / len(idx)
    pk, pv, tv = [], [], []
    for h in range(hkv):
        qs = q[h * g:(h + 1) * g, idx]                                      # (g, n, d)
        bs = (bias[h * g:(h + 1) * g] if bias.shape[0] > 1 else bias[:1])[:, idx]
        a = torch.softmax(tau * (qs @ k[h].T) + bs, dim=-1)
        at = torch.softmax(tau * (qs @ kq[h].T) + bs, dim=-1)
        w = go[h * g:(h + 1) * g, idx].double().square()
        dk = (at - a) @ v[h]
        dv = a @ (vq[h] - v[h])
        pk.append(0.5 * scale * float((w * dk.double().square()).sum()))
        pv.append(0.5 * scale * float((w * dv.double().square()).sum()))
        tv.append(float(0.5 * (at - a).abs().sum(-1).mean(-1).max()))
    return pk, pv, tv


def _roundtrip_all(x, fmt):
    """dequant(quant(x)) for x (..., n, d); channel groups aligned at 0, a short last group on its own."""
    import torch

    from ..kv.quant import dequantize, quantize, roundtrip

    if fmt.granularity != "channel":
        return roundtrip(x, fmt)
    n = x.shape[-2]
    full = n - n % fmt.group
    parts = []
    if full:
        parts.append(roundtrip(x[..., :full, :], fmt))
    if n > full:
        parts.append(dequantize(quantize(x[..., full:, :], fmt, group_tokens=n - full)))
    return torch.cat(parts, dim=-2)


def split_attention(grads: dict):
    """The model's attention (its mask and scaling, float32) whose backward records, per layer in ``grads``:
    "key", "value" (Hkv, T, d) and "k", "v" (windows, Hkv, T, d), the gradient of the loss by each cached
    key and value through the reads at distance i - s >= R, for each R of the grid."""
    import torch

    from .analyzer import attention_bias, refuse_unimplemented_attention

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        refuse_unimplemented_attention(module, dropout, kwargs, "the sensitivity pass' attention")
        b, hq, tq, d = query.shape
        if b != 1 or key.shape[2] != tq:
            from ..errors import ModelError

            raise ModelError("the sensitivity pass runs one sequence without a cache (queries = cached positions)")
        hkv = key.shape[1]
        g = hq // hkv
        tau = float(scaling if scaling is not None else getattr(module, "scaling", d ** -0.5))
        li = int(module.layer_idx)
        q, k, v = query.float(), key.float(), value.float()
        kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        bias = attention_bias(attention_mask, query, key, module)
        scores = tau * (q @ kk.transpose(-1, -2)) + bias
        a = torch.softmax(scores, dim=-1)
        out = a @ vv
        rec = grads.setdefault(li, {})
        rec["key"], rec["value"] = key[0].detach().float(), value[0].detach().float()
        rec["query"], rec["bias"], rec["tau"] = q[0].detach(), bias[0].detach(), tau
        qd, ad = q[0].detach(), a[0].detach()

        def on_scores(gs):              # d loss / d scores (1, Hq, T, T) -> per R, d loss / d K_s at distances >= R
            gk = tau * _split_by_distance(gs[0], qd)                       # (windows, Hq, T, d)
            rec["k"] = gk.unflatten(1, (hkv, g)).sum(2)

        def on_out(go):                 # d loss / d out (1, Hq, T, d) -> per R, d loss / d V_s at distances >= R
            rec["v"] = _split_by_distance(ad, go[0]).unflatten(1, (hkv, g)).sum(2)
            rec["dout"] = go[0].detach()

        scores.register_hook(on_scores)
        out.register_hook(on_out)
        return out.transpose(1, 2).contiguous().to(query.dtype), None

    return attn


def measure(lm, windows, formats: dict, tokens: int = 1024, seed: int = 0, labels: str = "sampled",
            progress: bool = False) -> Sensitivity:
    """Run forward and backward over the first ``tokens`` of each calibration window and price every format.

    ``formats``: name -> Format (the table the planner chooses from). ``labels``: "sampled" (the model's own
    distribution: the Fisher of the KL) or "text" (the next tokens: the empirical Fisher)."""
    import numpy as np
    import torch

    from ..errors import InvalidArgument
    from .routing import routed_attention

    if labels not in ("sampled", "text"):
        raise InvalidArgument(f"--fisher-labels must be sampled or text, got {labels!r}")
    model = lm.model
    t = min(tokens, windows.window)
    names = list(formats)
    ivs = intervals_of(t)
    nr, nf, ni = len(WINDOWS), len(names), len(ivs)
    js = [j for j, (lo, _) in enumerate(ivs) if lo >= JOINT_SINK]       # the joint measurement's positions
    grads: dict = {}                    # layer -> {"k": (windows, Hkv, T, d), "v": ..., "key", "value"}
    cost = out_price = tv_sum = None
    coarse = [i for i, n in enumerate(names)
              if formats[n].value_bits <= NONLINEAR_BITS and formats[n].family in ("int", "codebook")]
    # the joint measurement (first window): the coarse per-token formats and those of the analysis' channel group;
    # a smaller group takes the ratio of its family and bits at that group
    big = max([f.group for f in formats.values() if f.granularity == "channel"], default=None)
    measured = [i for i in coarse if formats[names[i]].granularity != "channel" or formats[names[i]].group == big]
    joint_kl = first = None
    gen = torch.Generator().manual_seed(seed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows.windows), desc="sensitivity windows", unit="window", leave=False)
    # gradients flow from the input embeddings through every hidden state; no weight takes one
    flags = [(p, p.requires_grad) for p in model.parameters()]
    embed = model.get_input_embeddings()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with routed_attention(model, split_attention(grads), prefix="hnfverify_fisher"):
            for w in windows.windows:
                ids = torch.tensor([w[:t]], dtype=torch.long)
                grads.clear()
                with torch.enable_grad():
                    x0 = embed(ids).detach().requires_grad_(True)
                    logits = model(inputs_embeds=x0, use_cache=False).logits[0].float()      # (T, vocab)
                    if labels == "sampled":
                        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
                        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                    else:
                        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
                    loss.backward()
                del logits, loss, x0
                if joint_kl is None:
                    joint_kl = _joint_kl(model, ids, measured, names, formats)
                with torch.no_grad():
                    for li in sorted(grads):
                        rec = grads[li]
                        if cost is None:
                            cost = np.zeros((len(grads), rec["key"].shape[0], 2, len(REGIONS), nr, nf, ni))
                        stored = [[_roundtrip_all(x, formats[n]) for n in names] for x in (rec["key"], rec["value"])]
                        for kvi, (x, gr) in enumerate(((rec["key"], rec["k"]), (rec["value"], rec["v"]))):
                            gr = gr.double()                                        # (windows, Hkv, T, d)
                            tot = gr[0]
                            w2 = torch.stack([tot.square().expand(nr, *tot.shape),  # sink: every query
                                              (tot - gr).square(),                  # recent: distances < R
                                              gr.square()])                         # rest: distances >= R
                            e2 = torch.stack([(y - x).double().square() for y in stored[kvi]])
                            e2 = torch.nan_to_num(e2, nan=1e300, posinf=1e300)     # a format that overflows
                            per = torch.einsum("xrhtd,fhtd->hxrft", w2, e2)        # (Hkv, 3, windows, formats, T)
                            for j, (lo, hi) in enumerate(ivs):
                                cost[li, :, kvi, :, :, :, j] += 0.5 * per[..., lo:hi].sum(-1).numpy()
                        if out_price is None:
                            out_price = np.zeros(cost.shape[:3] + (nf,))
                            tv_sum = np.zeros(cost.shape[:2] + (nf,))
                        for fi in coarse:
                            pk, pv, tv = _output_prices(rec, stored[0][fi], stored[1][fi])
                            out_price[li, :, 0, fi] += pk
                            out_price[li, :, 1, fi] += pv
                            tv_sum[li, :, fi] += tv
                grads.clear()
                if first is None and cost is not None:
                    first = cost[:, :, :, REGIONS.index("rest"), 0][..., js].sum(-1)    # (layers, kv_heads, 2, formats)
                if bar:
                    bar.update(1)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    if bar:
        bar.close()
    if cost is None:
        from ..errors import ModelError

        raise ModelError("the sensitivity pass captured no attention call")
    # the coarse formats' prices scaled so that reading every position in its rest form (R = 0) costs what the
    # attention output's diagonal Fisher says (docs/design.md §3.1); 1 for the finer formats
    ratio = np.ones(cost.shape[:3] + (nf,))
    whole = cost[:, :, :, REGIONS.index("rest"), 0].sum(-1)                # (layers, kv_heads, 2, formats)
    # only the coarse formats have output prices (out_price is 0 elsewhere): a finer format keeps its own
    # diagonal-Fisher estimate (scaling it by 0 priced FP8 / INT8 / FP16 as free)
    is_coarse = np.zeros(nf, dtype=bool)
    is_coarse[coarse] = True
    ok = (whole > 0) & is_coarse
    ratio[ok] = out_price[ok] / whole[ok]
    cost *= ratio[:, :, :, None, None, :, None]
    # and so that every unit of a kind in the format at once (rest form from JOINT_SINK on, R = 0) costs the KL
    # the model really shows then: the prices add over units, which drops the cross terms between heads, layers
    # and tokens that a biased error makes add up (docs/design.md §3.1)
    summed = (first * ratio).sum((0, 1))                                 # (2, formats), the first window
    joint = np.ones((2, nf))
    ok = np.isfinite(joint_kl) & (summed > 0) & (joint_kl > 0)
    joint[ok] = joint_kl[ok] / summed[ok]
    for i in coarse:
        f = formats[names[i]]
        if i not in measured:
            src = [m for m in measured if formats[names[m]].granularity == "channel"
                   and (formats[names[m]].family, formats[names[m]].value_bits) == (f.family, f.value_bits)]
            if src:
                joint[:, i] = joint[:, src[0]]
                joint_kl[:, i] = joint_kl[:, src[0]]
    cost *= joint[None, None, :, None, None, :, None]
    n = len(windows.windows)
    return Sensitivity(cost / n, names, ivs, t, n, labels, ratio, tv_sum / n, joint, joint_kl / t)
