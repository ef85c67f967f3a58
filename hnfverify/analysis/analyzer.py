"""The analyzer: one calibration run -> per (layer, KV head, position) sensitivity intervals.

Streaming: each attention call is reduced to (Hkv, T) statistics inside the instrumentation
sink and its q, K, V are released; memory is the model plus a few (T x T) float64 blocks.
Positions are cache positions 0..W-1 of a calibration window; statistics are maxima (sums for
the mean attention) over all windows, so they describe the sup over every calibration query.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

from .curvature import MAX_FIELDS, SINKS, WINDOWS, causal_allowed, position_stats, seed_curvature
from ..core.formats import channel_groups_of, is_power_of_two
from ..core.vocabulary import Curvature
from ..errors import InvalidArgument, ModelError, UnsupportedModel
from .instrument import AttentionCall, attention_modules, instrument, output_projection
from ..texts import TokenWindows

CURVATURES = Curvature.values()


@dataclass(frozen=True)
class AnalysisOptions:
    curvature: str = "exact"          # which curvature the planner uses: exact (docs/design.md §2.1) | seed (heuristic)
    channel_group: int = 128          # tokens per per-channel key/value quantization group (KIVI-style); plans
                                      # may use its divisors (docs/design.md §3)
    lipschitz_tokens: int = 32        # prefix of the first window used for the block Lipschitz estimate
    lipschitz_iters: int = 5          # Lanczos steps (products J v); 0 disables the estimate
    suffix_tokens: int = 128          # prefix of the first window for the suffix sensitivities (docs/design.md §2.5)
    suffix_iters: int = 6             # their Lanczos steps; 0 disables them (plans then use --composition product)
    fisher_tokens: int = 1024         # tokens of each window the measured sensitivities take a forward and backward
                                      # pass over (docs/design.md §3.1); 0 disables them
    fisher_labels: str = "sampled"    # "sampled" (the model's own distribution) | "text" (the next tokens)
    seed: int = 0

    def validate(self) -> None:
        if self.curvature not in CURVATURES:
            raise InvalidArgument(f"--curvature must be one of {list(CURVATURES)}, got {self.curvature!r}")
        if self.channel_group < 1:
            raise InvalidArgument(f"--channel-group must be >= 1, got {self.channel_group}")
        if self.lipschitz_tokens < 2:
            raise InvalidArgument(f"--lipschitz-tokens must be >= 2, got {self.lipschitz_tokens}")
        if self.lipschitz_iters < 0:
            raise InvalidArgument(f"--lipschitz-iters must be >= 0, got {self.lipschitz_iters}")
        if self.suffix_tokens < 2:
            raise InvalidArgument(f"--suffix-tokens must be >= 2, got {self.suffix_tokens}")
        if self.suffix_iters < 0:
            raise InvalidArgument(f"--suffix-iters must be >= 0, got {self.suffix_iters}")
        if self.fisher_tokens < 0 or self.fisher_tokens == 1:
            raise InvalidArgument(f"--fisher-tokens must be 0 or >= 2, got {self.fisher_tokens}")
        if self.fisher_labels not in ("sampled", "text"):
            raise InvalidArgument(f"--fisher-labels must be sampled or text, got {self.fisher_labels!r}")


@dataclass
class Analysis:
    """Result: ``arrays`` maps field name -> numpy array (see ``report.ARRAY_FIELDS``); ``meta`` the rest."""

    arrays: dict
    meta: dict
    timings: dict = field(default_factory=dict)


def _allowed_from_mask(call: AttentionCall, b: int, tq: int, tk: int):
    import torch

    mask = call.attention_mask
    if mask is None:
        return causal_allowed(tq, tk, call.kwargs.get("sliding_window"))
    if not torch.is_tensor(mask):
        raise ModelError(f"layer {call.layer}: unsupported attention mask type {type(mask).__name__}")
    m = mask[b if mask.shape[0] > 1 else 0]
    if m.dim() == 3:
        if m.shape[0] != 1:
            raise ModelError(f"layer {call.layer}: per-head attention masks are not supported")
        m = m[0]
    m = m[-tq:, -tk:]
    if m.dtype == torch.bool:
        return m.clone()
    return m > torch.finfo(m.dtype).min / 2


# attention arguments that do not change an attention call's result once its mask is given: the mask
# already encodes causality, padding and any sliding window (transformers' eager mask, masking_utils)
_MASKED_BY_THE_MASK = ("sliding_window", "is_causal")
_NO_EFFECT = ("position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
              "output_router_logits", "num_items_in_batch", "position_embeddings")


def refuse_unimplemented_attention(module, dropout, kwargs: dict, who: str) -> None:
    """Raise UnsupportedModel if an attention call carries an argument that changes its result and that
    ``who`` (a re-implementation of the model's attention from q, K, V, mask and scaling) does not
    implement: dropout > 0, logit soft-capping, learned attention sinks (``s_aux``), or anything unknown."""
    from ..errors import UnsupportedModel

    bad = []
    if dropout is not None and float(dropout) > 0:
        bad.append(f"attention dropout {float(dropout)} (the model is in training mode)")
    if kwargs.get("softcap"):
        bad.append(f"attention logit soft-capping (softcap={kwargs['softcap']})")
    if kwargs.get("s_aux") is not None:
        bad.append("learned attention sinks (s_aux)")
    for k, v in kwargs.items():
        if k not in ("softcap", "s_aux") + _MASKED_BY_THE_MASK + _NO_EFFECT and v is not None:
            bad.append(f"the attention argument {k}={type(v).__name__}")
    if bad:
        layer = getattr(module, "layer_idx", "?")
        raise UnsupportedModel(f"layer {layer} ({type(module).__name__}): {who} does not implement "
                               f"{'; '.join(bad)}, which change the model's attention")


def attention_bias(attention_mask, query, key, module=None):
    """The additive score bias of an attention call, exactly as transformers' eager attention applies it
    (``scores + mask[:, :, :, :Tk]``): float32 (B or 1, Hq or 1, Tq, Tk). The mask transformers builds for the
    eager mask interface is additive (0 / finfo.min); a boolean mask (True = attend) becomes 0 / -inf.
    A call without a mask is refused: what the model would compute then depends on its implementation."""
    import torch

    from ..errors import UnsupportedModel

    layer = getattr(module, "layer_idx", "?")
    if attention_mask is None:
        raise UnsupportedModel(f"layer {layer}: the model passed no attention mask to its attention function")
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 4:
        raise UnsupportedModel(f"layer {layer}: unsupported attention mask "
                               f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}")
    b, hq, tq, _ = query.shape
    tk = key.shape[-2]
    m = attention_mask[:, :, :, :tk]
    if m.shape[0] not in (1, b) or m.shape[1] not in (1, hq) or m.shape[2] != tq or m.shape[3] != tk:
        raise UnsupportedModel(f"layer {layer}: attention mask of shape {tuple(attention_mask.shape)} does not fit "
                               f"queries {tuple(query.shape)} and keys {tuple(key.shape)}")
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32).masked_fill(~m, float("-inf"))
    return m.to(torch.float32)


class _Accumulator:
    """Running per-layer maxima over windows. All tensors (L, Hkv, T) float64 unless noted."""

    def __init__(self, n_layers: int, hkv: int, hq: int, t: int, d: int, g: int):
        import torch

        z = lambda: torch.zeros(n_layers, hkv, t, dtype=torch.float64)  # noqa: E731
        self.lo = {f: z() for f in MAX_FIELDS}
        self.hi = {f: z() for f in MAX_FIELDS}
        self.alpha_sum = z()
        self.n_queries = torch.zeros(n_layers, hkv, t, dtype=torch.int64)
        inf = float("inf")
        n_groups = math.ceil(t / g)
        # the smaller groups a plan may use instead (docs/design.md §3), each with its own diameters
        self.sub_groups = [s for s in channel_groups_of(g) if s != g]
        self.ranges = {}
        for kv in ("k", "v"):
            self.ranges[f"{kv}_tok_min"] = torch.full((n_layers, hkv, t), inf, dtype=torch.float32)
            self.ranges[f"{kv}_tok_max"] = torch.full((n_layers, hkv, t), -inf, dtype=torch.float32)
            self.ranges[f"{kv}_ch_min"] = torch.full((n_layers, hkv, n_groups, d), inf, dtype=torch.float32)
            self.ranges[f"{kv}_ch_max"] = torch.full((n_layers, hkv, n_groups, d), -inf, dtype=torch.float32)
            self.ranges[f"{kv}_d_token"] = z()
            self.ranges[f"{kv}_d_channel"] = z()
            for sub in self.sub_groups:
                self.ranges[f"{kv}_d_channel_g{sub}"] = z()
            if is_power_of_two(d):          # the rotated formats' ranges (docs/design.md §2.3c)
                self.ranges[f"{kv}_rot_min"] = torch.full((n_layers, hkv, t), inf, dtype=torch.float64)
                self.ranges[f"{kv}_rot_max"] = torch.full((n_layers, hkv, t), -inf, dtype=torch.float64)
                self.ranges[f"{kv}_d_token_h"] = z()
        if is_power_of_two(d):
            from ..kv.rotation import hadamard64

            self.hadamard = hadamard64(d)
        else:
            self.hadamard = None
        n_s, n_r = len(SINKS), len(WINDOWS)
        self.split = {
            "kappa_far_lo": torch.zeros(n_layers, n_r, hkv, t, dtype=torch.float64),
            "kappa_far_hi": torch.zeros(n_layers, n_r, hkv, t, dtype=torch.float64),
            "kappa_near_lo": torch.zeros(n_layers, n_r, hkv, t, dtype=torch.float64),
            "kappa_near_hi": torch.zeros(n_layers, n_r, hkv, t, dtype=torch.float64),
            "mass_alpha_lo": torch.zeros(n_layers, n_s, n_r, 3, hkv, dtype=torch.float64),
            "mass_alpha_hi": torch.zeros(n_layers, n_s, n_r, 3, hkv, dtype=torch.float64),
            "mass_avo_lo": torch.zeros(n_layers, n_s, n_r, 3, hkv, dtype=torch.float64),
            "mass_avo_hi": torch.zeros(n_layers, n_s, n_r, 3, hkv, dtype=torch.float64),
        }
        self.scaling = [None] * n_layers
        self.seen = [0] * n_layers
        # per layer, the largest central kappa of any head and what re-evaluates it (docs/design.md §2.1b):
        # (value, head, q (d,), K (T, d), V (T, d), allowed (T,), t), numpy float32 copies
        self.witness = [None] * n_layers
        self.g, self.t, self.d = g, t, d

    def add(self, call: AttentionCall) -> None:
        import torch

        layer = call.layer
        q, k, v = call.query, call.key, call.value
        b_n, hq, tq, d = q.shape
        _, hkv, tk, _ = k.shape
        if tk != self.t or tq != tk:
            raise ModelError(f"layer {layer}: expected a cache-free pass of {self.t} tokens, got q {tq}, k {tk}")
        if self.scaling[layer] is None:
            self.scaling[layer] = call.scaling
        elif self.scaling[layer] != call.scaling:
            raise ModelError(f"layer {layer}: attention scaling changed between windows")
        for b in range(b_n):
            allowed = _allowed_from_mask(call, b, tq, tk)
            st = position_stats(q[b], k[b], v[b], call.scaling, allowed)
            for f in MAX_FIELDS:
                torch.maximum(self.hi[f][layer], st.hi[f], out=self.hi[f][layer])
                torch.maximum(self.lo[f][layer], st.lo[f], out=self.lo[f][layer])
            self.alpha_sum[layer] += st.alpha_sum
            self.n_queries[layer] += st.n_queries
            for name, arr in self.split.items():
                torch.maximum(arr[layer], getattr(st, name), out=arr[layer])
            for name, x in (("k", k[b]), ("v", v[b])):
                self._ranges(layer, name, x.detach().to(torch.float32))
            exact32 = q.dtype in (torch.float32, torch.bfloat16, torch.float16)   # witnesses need float32 numbers
            for h, w in enumerate(st.witness or () if exact32 else ()):
                if w is not None and (self.witness[layer] is None or w[0] > self.witness[layer][0]):
                    val, gi, i, t = w
                    g = hq // hkv
                    self.witness[layer] = (val, h, q[b, h * g + gi, i].detach().float().numpy().copy(),
                                           k[b, h].detach().float().numpy().copy(),
                                           v[b, h].detach().float().numpy().copy(),
                                           allowed[i].numpy().copy(), t)
        self.seen[layer] += b_n

    def _ranges(self, layer: int, name: str, x) -> None:
        """x: (Hkv, T, d) float32. Updates per-token and per-channel ranges and diameters."""
        import torch
        import torch.nn.functional as F

        hkv, t, d = x.shape
        r = self.ranges
        tmin, tmax = x.amin(-1), x.amax(-1)
        torch.minimum(r[f"{name}_tok_min"][layer], tmin, out=r[f"{name}_tok_min"][layer])
        torch.maximum(r[f"{name}_tok_max"][layer], tmax, out=r[f"{name}_tok_max"][layer])
        # per-token group = the head's d channels; box [min, max]^d has l2 diameter sqrt(d) (max - min)
        d_tok = (tmax.double() - tmin.double()) * math.sqrt(d) * (1 + 2.0 ** -30)
        torch.maximum(r[f"{name}_d_token"][layer], d_tok, out=r[f"{name}_d_token"][layer])
        if self.hadamard is not None:
            # H x in float64 (H symmetric, orthogonal), each end pushed out by a bound of the product's rounding:
            # |fl(Hx)_i - (Hx)_i| <= gamma_d^(64) ||x||_1 / sqrt(d) <= (d + 2) 2^-53 ||x||_2, doubled for the sqrt
            x64 = x.double()
            y = x64 @ self.hadamard
            w = x64.norm(dim=-1) * ((d + 2) * 2.0 ** -52)
            ylo, yhi = y.amin(-1) - w, y.amax(-1) + w
            torch.minimum(r[f"{name}_rot_min"][layer], ylo, out=r[f"{name}_rot_min"][layer])
            torch.maximum(r[f"{name}_rot_max"][layer], yhi, out=r[f"{name}_rot_max"][layer])
            d_h = (yhi - ylo) * math.sqrt(d) * (1 + 2.0 ** -30)
            torch.maximum(r[f"{name}_d_token_h"][layer], d_h, out=r[f"{name}_d_token_h"][layer])
        # per-channel groups of g tokens; box prod_c [min_c, max_c] has diameter ||max - min||_2
        g = self.g
        n_groups = math.ceil(t / g)
        pad = n_groups * g - t
        xp_min = F.pad(x, (0, 0, 0, pad), value=float("inf")).reshape(hkv, n_groups, g, d).amin(2)
        xp_max = F.pad(x, (0, 0, 0, pad), value=float("-inf")).reshape(hkv, n_groups, g, d).amax(2)
        torch.minimum(r[f"{name}_ch_min"][layer], xp_min, out=r[f"{name}_ch_min"][layer])
        torch.maximum(r[f"{name}_ch_max"][layer], xp_max, out=r[f"{name}_ch_max"][layer])
        d_ch = (xp_max.double() - xp_min.double()).norm(dim=-1) * (1 + 2.0 ** -30)   # (Hkv, n_groups)
        d_ch = d_ch.repeat_interleave(g, dim=1)[:, :t]
        torch.maximum(r[f"{name}_d_channel"][layer], d_ch, out=r[f"{name}_d_channel"][layer])
        if not self.sub_groups:
            return
        # the smaller groups (multiples of 8): per-channel extremes of 8-token blocks once, then of k blocks
        n8 = math.ceil(t / 8)
        lo8 = F.pad(x, (0, 0, 0, n8 * 8 - t), value=float("inf")).reshape(hkv, n8, 8, d).amin(2)
        hi8 = F.pad(x, (0, 0, 0, n8 * 8 - t), value=float("-inf")).reshape(hkv, n8, 8, d).amax(2)
        for sub in self.sub_groups:
            k = sub // 8
            n_sub = math.ceil(n8 / k)
            pad = n_sub * k - n8
            lo = F.pad(lo8, (0, 0, 0, pad), value=float("inf")).reshape(hkv, n_sub, k, d).amin(2)
            hi = F.pad(hi8, (0, 0, 0, pad), value=float("-inf")).reshape(hkv, n_sub, k, d).amax(2)
            d_sub = ((hi.double() - lo.double()).norm(dim=-1) * (1 + 2.0 ** -30)).repeat_interleave(sub, dim=1)[:, :t]
            out = r[f"{name}_d_channel_g{sub}"][layer]
            torch.maximum(out, d_sub, out=out)


#: attention calls the forward may run ahead of the statistics (each holds one layer's q, K, V)
_IN_FLIGHT = 4


@contextlib.contextmanager
def _pipelined(add, threads: int):
    """Yield a sink that hands each attention call to ``add`` on one worker thread (``threads`` intra-op
    threads), in order, while the caller's forward runs on: the per-(query, key) statistics gain little from
    intra-op threads, and side by side the two use the cores better (docs/design.md §2.1c). With
    ``threads`` 0 the sink is ``add`` itself. On leaving, every call has been added; an error in ``add`` is
    raised here."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    if threads < 1:
        yield add
        return
    slots = threading.BoundedSemaphore(_IN_FLIGHT)
    futures = []

    def run(call):
        try:
            add(call)
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        def sink(call):
            slots.acquire()
            futures.append(pool.submit(run, call))
        try:
            yield sink
        finally:
            for f in futures:
                f.result()


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to n inside the block (for the calling thread), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_WITNESS_FIELDS = (("alpha_max", "alpha"), ("vo_max", "vo"), ("alpha_vo_max", "alpha_vo"), ("kappa", "kappa"),
                   ("grad_k", "grad"))


def _check_witnesses(acc: _Accumulator) -> dict:
    """Re-evaluate every layer's witness (the query and key position of its largest central kappa) in
    outward-rounded interval arithmetic (docs/design.md §2.1b): the float enclosure of each maximum there
    must reach the witness's exact value, and its lower end rises to it. Raises ModelError where the float
    enclosure misses it (the rounding derivation would be wrong for these inputs)."""
    from .witness import enclose

    checked, gap = 0, 0.0
    for li, w in enumerate(acc.witness):
        if w is None:
            continue
        _, h, q, k, v, allowed, t = w
        enc = enclose(q, k, v, acc.scaling[li], allowed, t)
        for field, name in _WITNESS_FIELDS:
            lo_w, hi_w = getattr(enc, name)
            hi, lo = float(acc.hi[field][li, h, t]), float(acc.lo[field][li, h, t])
            if hi < lo_w or (field == "kappa" and lo > hi_w):
                raise ModelError(f"layer {li}, KV head {h}, position {t}: the float enclosure [{lo:.17g}, {hi:.17g}] "
                                 f"of {field} does not contain what its witness query's exact value [{lo_w:.17g}, "
                                 f"{hi_w:.17g}] requires; the analysis' rounding bounds fail on these inputs")
            acc.lo[field][li, h, t] = max(lo, lo_w)
            if field == "kappa" and lo_w > 0:
                gap = max(gap, hi / lo_w - 1.0)
        acc.lo["htrace"][li, h, t] = 2.0 * acc.lo["kappa"][li, h, t]
        checked += 1
    return {"layers": checked, "fields": [f for f, _ in _WITNESS_FIELDS],
            "kappa_hi_over_witness_lo_minus_1": gap}


def _layer_blocks(model) -> dict:
    """layer index -> decoder block (the parent module of each attention module)."""
    mods = dict(model.named_modules())
    blocks = {}
    for name, attn in attention_modules(model):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        blocks[int(attn.layer_idx)] = mods[parent]
    return blocks


def analyze(lm, windows: TokenWindows, options: AnalysisOptions = AnalysisOptions(), progress: bool = False) -> Analysis:
    """Run the calibration windows through ``lm.model`` and return the per-position analysis."""
    import numpy as np
    import torch

    options.validate()
    model = lm.model
    attn = attention_modules(model)
    if not attn:
        raise ModelError(f"model {lm.name!r} ({type(model).__name__}) has no attention layers hnfverify can analyze")
    from ..models import model_shape, weights_sha256

    shape = model_shape(model)
    n_layers, hkv, hq, d = shape["layers"], shape["kv_heads"], shape["query_heads"], shape["head_dim"]
    t = windows.window
    acc = _Accumulator(n_layers, hkv, hq, t, d, options.channel_group)

    body = getattr(model, "base_model", None) or model
    # measured Lipschitz estimates of every decoder block and of the rest of each block after its attention
    # (residual + MLP), at the hidden states of a calibration prefix, captured first (docs/design.md §2.5a)
    lips, lips_rel, mlp_lips, mlp_lips_rel = (np.full(n_layers, np.nan) for _ in range(4))
    t1 = time.perf_counter()
    lip_tasks = []
    if options.lipschitz_iters > 0:
        from .lipschitz import block_lipschitz, capture_block_inputs, capture_mid_states, mlp_lipschitz, rest_of_block

        blocks = _layer_blocks(model)
        for li in sorted(blocks):
            rest_of_block(blocks[li])               # refuse other decoder-layer structures before any work
        n_tok = min(options.lipschitz_tokens, t)
        ids = torch.tensor([windows.windows[0][:n_tok]], dtype=torch.long)
        with torch.no_grad(), capture_block_inputs(model, blocks) as cap, capture_mid_states(blocks) as mid:
            body(input_ids=ids, use_cache=False)

        def one(li):
            b = block_lipschitz(blocks[li], *cap[li], iters=options.lipschitz_iters, seed=options.seed)
            m = mlp_lipschitz(blocks[li], mid.get(li), iters=options.lipschitz_iters, seed=options.seed)
            return li, b, m

        lip_tasks = sorted(blocks)
    t_capture = time.perf_counter() - t1

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows.windows) + len(lip_tasks), desc="calibration windows, Lipschitz layers",
                   unit="step", leave=False)
    t0 = time.perf_counter()
    # docs/design.md §2.1c: the forward (the decoder stack alone: no logits needed) with the statistics on a
    # worker beside it and the weights' sha256 (the plan is tied to them, models.check_plan_matches_model) on
    # a thread of its own; then the Lipschitz layers on one-thread workers (each an eager view of its block,
    # so they need no change to the model's routing; beside the forward they gained nothing on 2 cores)
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    beside = threads >= 2
    each = threads // 2 if beside else threads            # the forward's and the statistics' share
    lip_workers = max(1, min(threads, len(lip_tasks) or 1))
    with _torch_threads(each), ThreadPoolExecutor(max_workers=1) as hasher, \
            ThreadPoolExecutor(max_workers=lip_workers, initializer=torch.set_num_threads, initargs=(1,)) as lip_pool:
        weights_job = hasher.submit(weights_sha256, model)
        with torch.no_grad(), _pipelined(acc.add, each if beside else 0) as sink, instrument(model, sink):
            for w in windows.windows:
                ids = torch.tensor([w], dtype=torch.long)
                body(input_ids=ids, use_cache=False)
                if bar:
                    bar.update(1)
        t_stats = time.perf_counter() - t0
        weights = weights_job.result()
        for job in [lip_pool.submit(one, li) for li in lip_tasks]:
            li, b, m = job.result()
            lips[li], lips_rel[li] = b.value, b.rel_change
            mlp_lips[li], mlp_lips_rel[li] = m.value, m.rel_change
            if bar:
                bar.update(1)
    t_lip = t_capture + (time.perf_counter() - t0 - t_stats)     # what the estimates add beyond the forward
    if isinstance(getattr(lm, "extra_identity", None), dict):
        lm.extra_identity["weights_sha256"] = weights      # lm.identity() now names the analyzed weights
    if bar:
        bar.close()
    missing = [i for i in range(n_layers) if acc.seen[i] == 0]
    if missing:
        raise ModelError(f"no attention call was captured for layers {missing[:5]}: the model does not route "
                         "attention through transformers' attention interface")
    t_w = time.perf_counter()
    witnesses = _check_witnesses(acc)
    witnesses["seconds"] = round(time.perf_counter() - t_w, 3)

    # output projection restricted to each query head's and each KV group's slice (spectral norms)
    o_q = np.zeros((n_layers, hq))
    o_kv = np.zeros((n_layers, hkv))
    g = hq // hkv
    for _, m in attn:
        w = output_projection(m).weight.detach().to(torch.float64)        # (hidden, Hq*d)
        if w.shape[1] != hq * d:
            w = w.T
        li = int(m.layer_idx)
        for h in range(hq):
            o_q[li, h] = float(torch.linalg.matrix_norm(w[:, h * d:(h + 1) * d], ord=2))
        for h in range(hkv):
            o_kv[li, h] = float(torch.linalg.matrix_norm(w[:, h * g * d:(h + 1) * g * d], ord=2))
    o_q *= 1 + 2.0 ** -30
    o_kv *= 1 + 2.0 ** -30


    # measured suffix sensitivities, remainder constant and lm_head gain (docs/design.md §2.5, §2.6)
    t2 = time.perf_counter()
    sfx_meta = None
    if options.suffix_iters > 0:
        from .suffix import measure

        n_tok = min(options.suffix_tokens, t)
        ids = torch.tensor([windows.windows[0][:n_tok]], dtype=torch.long)
        try:
            sm = measure(model, ids, iters=options.suffix_iters, seed=options.seed, progress=progress)
        except UnsupportedModel as e:          # e.g. a soft-capped lm_head: plans compose by products
            sm, sfx_meta = None, {"unsupported": str(e)}
    if options.suffix_iters > 0 and sm is not None:
        arrays_sfx = {"suffix": np.array(sm.suffix, dtype=np.float64),
                      "suffix_rel_change": np.array(sm.rel_change, dtype=np.float64),
                      "suffix_remainder": np.array([sm.remainder]), "suffix_radius": np.array([sm.radius]),
                      "logit_gain": np.array([sm.logit_gain])}
        sfx_meta = {"tokens": sm.tokens, "iterations": sm.iterations, "probes": sm.probes}
    t_sfx = time.perf_counter() - t2

    # measured sensitivities of the output to each cached K/V in each format: the fisher objective's prices
    t3 = time.perf_counter()
    fisher = None
    if options.fisher_tokens > 0:
        from ..core.formats import format_table
        from .sensitivity import measure as measure_fisher

        fisher = measure_fisher(lm, windows, format_table(d, options.channel_group), tokens=options.fisher_tokens,
                                seed=options.seed, labels=options.fisher_labels, progress=progress)
    t_fisher = time.perf_counter() - t3

    n_q = acc.n_queries.clamp_min(1).double()
    alpha_mean = acc.alpha_sum / n_q
    seed_k = seed_curvature(alpha_mean, acc.hi["grad_k"], acc.hi["htrace"])
    arrays = {}
    for f in MAX_FIELDS:
        arrays[f"{f}_lo"] = acc.lo[f].numpy()
        arrays[f"{f}_hi"] = acc.hi[f].numpy()
    arrays["kappa_exact_lo"] = arrays.pop("kappa_lo")
    arrays["kappa_exact_hi"] = arrays.pop("kappa_hi")
    arrays["kappa_seed"] = seed_k.numpy()
    if options.curvature == "exact":
        arrays["kappa_lo"], arrays["kappa_hi"] = arrays["kappa_exact_lo"], arrays["kappa_exact_hi"]
    else:
        arrays["kappa_lo"], arrays["kappa_hi"] = arrays["kappa_seed"], arrays["kappa_seed"]
    arrays["kappa_v"] = np.zeros_like(arrays["kappa_exact_hi"])
    arrays["alpha_mean"] = alpha_mean.numpy()
    arrays["n_queries"] = acc.n_queries.numpy()
    for k_, v_ in acc.ranges.items():
        arrays[k_] = v_.numpy()
    for k_, v_ in acc.split.items():
        arrays[k_] = v_.numpy()
    arrays["o_proj_norm_qhead"] = o_q
    arrays["o_proj_norm_kvhead"] = o_kv
    arrays["lipschitz"] = lips
    arrays["lipschitz_rel_change"] = lips_rel
    arrays["mlp_lipschitz"] = mlp_lips
    arrays["mlp_lipschitz_rel_change"] = mlp_lips_rel
    if sfx_meta is not None and "tokens" in sfx_meta:
        arrays.update(arrays_sfx)
    if fisher is not None:
        arrays["fisher"] = fisher.cost
        arrays["fisher_output_ratio"] = fisher.ratio
        arrays["fisher_key_tv"] = fisher.key_tv
        arrays["fisher_joint_ratio"] = fisher.joint
        arrays["fisher_joint_kl"] = fisher.joint_kl
    arrays["scaling"] = np.array([s if s is not None else np.nan for s in acc.scaling], dtype=np.float64)
    arrays = {k_: np.ascontiguousarray(v_) for k_, v_ in arrays.items()}
    meta = {
        "shape": {"layers": n_layers, "kv_heads": hkv, "query_heads": hq, "head_dim": d, "positions": t,
                  "channel_groups": int(math.ceil(t / options.channel_group))},
        "rule_grid": {"sinks": list(SINKS), "windows": list(WINDOWS), "segments": ["sink", "recent", "rest"]},
        "options": {"curvature": options.curvature, "channel_group": options.channel_group,
                    "channel_groups": channel_groups_of(options.channel_group),
                    "lipschitz_tokens": min(options.lipschitz_tokens, t), "lipschitz_iters": options.lipschitz_iters,
                    "seed": options.seed, "suffix": sfx_meta,
                    "fisher": fisher.meta() if fisher is not None else None},
        "attn_implementation": model.config._attn_implementation,
        "weights_sha256": weights,
        "witnesses": witnesses,
    }
    return Analysis(arrays, meta, {"stats_s": t_stats, "lipschitz_s": t_lip, "suffix_s": t_sfx,
                                   "fisher_s": t_fisher})
