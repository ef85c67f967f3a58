"""Peers for the benchmarks: transformers' own ``QuantizedCache`` (optimum-quanto backend) in the same
teacher-forced protocol as hnfverify's plans.

transformers 5.24's ``QuantizedLayer.update`` (cache_utils.py) holds a quantized part and a residual in
the model's dtype: the prefill quantizes every prefix token at once; each decoded token joins the
residual, and when the residual would reach ``residual_length`` the whole cache (the dequantized
quantized part, the residual and the current token) is quantized again. The current query always
sees the states *before* that flush. So with prefill length P and residual R, the scored queries fall
into epochs [P + kR, P + (k+1)R): inside epoch k every query sees dequant(Q_k) for positions < P + kR
and exact states after, where Q_0 = quantize(K[:P]) and Q_{k+1} = quantize(cat(dequant(Q_k),
K[P + kR : P + (k+1)R])). :func:`quanto_method` reproduces exactly that, calling the layer's own
``_quantize``/``_dequantize`` on the same tensors; ``tests/evaluation/test_peers.py`` compares it with
token-by-token decoding through a real ``QuantizedCache``.
"""

from __future__ import annotations

from ..analysis.routing import routed_attention
from .attention import WindowStats
from .method import Method


def packed_nbytes(t) -> int:
    """Real bytes of a (possibly nested quanto) tensor subclass: the sum over its inner plain tensors."""
    flat = getattr(t, "__tensor_flatten__", None)
    if flat is None:
        return t.numel() * t.element_size()
    return sum(packed_nbytes(getattr(t, n)) for n in flat()[0])


def epoch_attention(query, keys_of, values_of, starts, t_len, scaling, bias):
    """The model's attention (additive mask ``bias`` (B|1, Hq|1, T, T), see
    :func:`hnfverify.analysis.analyzer.attention_bias`) where queries in [starts[k], starts[k+1]) see keys_of(k) /
    values_of(k) (each (B, Hkv, T, D)). Returns (B, T, Hq, D)."""
    import torch

    b, hq, _, d = query.shape
    out = torch.empty(b, t_len, hq, d, dtype=query.dtype)
    bounds = list(starts) + [t_len]
    for k in range(len(starts)):
        i0, i1 = bounds[k], bounds[k + 1]
        if i1 <= i0:
            continue
        kk, vv = keys_of(k)[:, :, :i1], values_of(k)[:, :, :i1]
        g = hq // kk.shape[1]
        kk, vv = kk.repeat_interleave(g, dim=1), vv.repeat_interleave(g, dim=1)
        mask = bias[:, :, i0:i1, :i1].to(query.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(query[:, :, i0:i1], kk, vv, attn_mask=mask,
                                                             scale=scaling)
        out[:, i0:i1] = o.transpose(1, 2)
    return out


def quanto_method(nbits: int, residual: int = 128, group: int = 64, axis_key: int = 0, axis_value: int = 0,
                  name: str | None = None) -> Method:
    """transformers' QuantizedCache(backend="quanto") as a teacher-forced method (see the module doc)."""
    from transformers.cache_utils import QuantoQuantizedLayer

    def context(model, prefix, window_stats: WindowStats):
        from transformers.cache_utils import get_layer_types_and_kwargs

        from ..errors import UnsupportedModel

        # transformers' QuantizedCache refuses models with other than full-attention layers: nothing to emulate
        layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise UnsupportedModel(f"transformers' QuantizedCache supports only full-attention models; "
                                   f"{type(model).__name__} has {', '.join(other)} layers (sliding windows)")
        layer = QuantoQuantizedLayer(nbits=nbits, axis_key=axis_key, axis_value=axis_value, q_group_size=group,
                                     residual_length=residual)

        def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            import torch

            from ..analysis.analyzer import attention_bias, refuse_unimplemented_attention

            refuse_unimplemented_attention(module, dropout, kwargs, "the quanto peer's teacher-forced attention")
            bias = attention_bias(attention_mask, query, key, module)     # the model's own mask
            t_len = key.shape[2]
            tau = float(scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5))
            starts = [0]
            versions = [(key, value)]                       # prefill queries: exact
            if t_len > prefix:
                qk = layer._quantize(key[:, :, :prefix].contiguous(), axis=axis_key)
                qv = layer._quantize(value[:, :, :prefix].contiguous(), axis=axis_value)
                b = prefix
                while b < t_len:
                    dk, dv = layer._dequantize(qk), layer._dequantize(qv)
                    starts.append(b)
                    versions.append((torch.cat([dk, key[:, :, b:]], dim=2), torch.cat([dv, value[:, :, b:]], dim=2)))
                    e = min(b + residual, t_len)
                    if e - b == residual:                   # the flush after the epoch's last query
                        qk = layer._quantize(torch.cat([dk, key[:, :, b:e]], dim=2).contiguous(), axis=axis_key)
                        qv = layer._quantize(torch.cat([dv, value[:, :, b:e]], dim=2).contiguous(),
                                             axis=axis_value)
                    b = e
            # for nbytes at any length n: the layer (its quantizer), the shape and the prefill length
            window_stats.kv[int(module.layer_idx)] = (layer, tuple(key.shape[:2]) + (key.shape[3],), key.dtype, prefix)
            out = epoch_attention(query, lambda k: versions[k][0], lambda k: versions[k][1], starts, t_len, tau,
                                   bias)
            return out, None

        return routed_attention(model, attn, prefix="hnfverify_peer")

    def nbytes(window_stats: WindowStats, n: int) -> int:
        import torch

        total = 0
        for layer, (b, h, d), dtype, prefix in window_stats.kv.values():
            n_q = n if n <= prefix else prefix + (n - prefix) // residual * residual
            key = (b, h, d, dtype, n_q)
            if key not in qbytes:                           # the byte count does not depend on the values
                z = torch.ones(b, h, n_q, d, dtype=dtype)
                qbytes[key] = packed_nbytes(layer._quantize(z, axis=axis_key)) + \
                    packed_nbytes(layer._quantize(z, axis=axis_value))
            total += qbytes[key] + 2 * b * h * d * (n - n_q) * torch.empty((), dtype=dtype).element_size()
        return total

    qbytes: dict = {}

    return Method(name or f"quanto-int{nbits}", context, nbytes,
                  protocol=f"teacher-forced emulation of transformers QuantizedCache(backend='quanto', nbits={nbits}, "
                           f"residual_length={residual}, q_group_size={group}) (hnfverify.evaluation.quanto)")


def quanto_cache(config, nbits: int, residual: int = 128, group: int = 64):
    """The real transformers cache the emulation follows (for decoding and timing)."""
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=config, nbits=nbits, residual_length=residual, q_group_size=group)
