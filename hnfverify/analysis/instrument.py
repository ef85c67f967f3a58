"""Scoped capture of every attention call's post-RoPE queries, keys, values and scaling.

Written against transformers' attention interface, not against one architecture: every modern
decoder in transformers computes ``q, k, v`` (after RoPE, per-head norms, etc.) and hands them to
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=...)``.
Inside ``with instrument(model, sink):`` the model's implementation name points to a wrapper
that calls the *same* function the model would have called (so outputs are bit-identical) and
then passes an :class:`AttentionCall` to ``sink``. The wrapper and its mask entry are registered
under a unique name for the duration of the block; the model's implementation name and both
registries are restored in ``finally``. Importing this module changes nothing.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import ModelError, UnsupportedModel
from .routing import routed_attention

@dataclass
class AttentionCall:
    """One attention call.

    query: (B, Hq, Tq, d) after RoPE; key, value: (B, Hkv, Tk, d) as cached (before repeat_kv);
    attention_mask: whatever the model passed (None, bool or additive float); scaling: tau.
    """

    layer: int
    module: Any
    query: Any
    key: Any
    value: Any
    attention_mask: Any
    scaling: float
    kwargs: dict = field(default_factory=dict)


def attention_modules(model) -> list[tuple[str, Any]]:
    """(name, module) of the self-attention modules: modules with a ``layer_idx`` whose class name
    contains 'Attention' and that own a projection to the output (o_proj/out_proj/dense/c_proj)."""
    found = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if "Attention" in cls and hasattr(mod, "layer_idx") and output_projection(mod) is not None:
            found.append((name, mod))
    return found


_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")


def output_projection(module):
    for n in _OUT_PROJ_NAMES:
        p = getattr(module, n, None)
        if p is not None and hasattr(p, "weight"):
            return p
    return None


def _unsupported_features(module) -> list[str]:
    bad = []
    if getattr(module, "attn_logit_softcapping", None):
        bad.append("attention logit soft-capping")
    if getattr(module, "sinks", None) is not None:
        bad.append("learned attention sinks")
    return bad


@contextlib.contextmanager
def instrument(model, sink: Callable[[AttentionCall], None]) -> Iterator[None]:
    """Call ``sink(AttentionCall)`` for every attention call made inside the block.

    The model computes exactly what it computes without instrumentation (same function, same mask).
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mods = attention_modules(model)
    if not mods:
        raise ModelError(f"{type(model).__name__} has no attention layers hnfverify can analyze "
                         "(no module with layer_idx and an output projection)")
    for _, m in mods:
        bad = _unsupported_features(m)
        if bad:
            raise UnsupportedModel(f"{type(m).__name__} uses {', '.join(bad)}, which the exact curvature "
                                   "analysis does not cover")
    config = model.config
    orig_name = config._attn_implementation or "eager"
    if orig_name not in ("eager",) and orig_name not in ALL_ATTENTION_FUNCTIONS:
        raise UnsupportedModel(f"attention implementation {orig_name!r} is not a registered attention function")
    if orig_name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise UnsupportedModel(f"attention implementation {orig_name!r} has no mask function to mirror")
    def target(module):
        if orig_name == "eager":
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise UnsupportedModel(f"{type(module).__module__} has no eager_attention_forward")
            return fn
        return ALL_ATTENTION_FUNCTIONS[orig_name]

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        out = target(module)(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", None)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        extra = {k: v for k, v in kwargs.items() if k in ("sliding_window", "softcap", "dropout")}
        if extra.get("softcap"):
            raise UnsupportedModel("attention logit soft-capping is not covered by the exact curvature analysis")
        sink(AttentionCall(int(module.layer_idx), module, query, key, value, attention_mask, float(scaling), extra))
        return out

    with routed_attention(model, wrapper, mask=orig_name, prefix="hnfverify_capture"):
        yield
