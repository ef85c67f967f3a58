"""``with routed_attention(model, fn):`` — the one place that swaps a model's attention function in
transformers' registry (analysis capture, plan evaluation, the quanto peer, eager Lipschitz runs)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

_names = itertools.count()


@contextlib.contextmanager
def routed_attention(model, fn: Callable | str, *, mask: str = "eager", prefix: str = "hnfverify_attention",
                     config=None) -> Iterator[None]:
    """Route the attention of ``model`` (or of ``config``) through ``fn`` inside the block.

    ``fn`` is either the name of an implementation transformers already knows (e.g. ``"eager"``) or an
    attention function, registered for the block under a unique name with the mask function of
    ``mask``. The previous implementation is restored and the registration removed in ``finally``.
    """
    config = model.config if config is None else config
    orig = config._attn_implementation
    # a registered function's route restores "eager" where no implementation was set (as the model's own
    # default); a named route restores exactly what was there
    restore = orig if isinstance(fn, str) else (orig or "eager")
    name = fn if isinstance(fn, str) else f"{prefix}_{next(_names)}"
    if not isinstance(fn, str):
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])
    try:
        config._attn_implementation = name
        yield
    finally:
        config._attn_implementation = restore
        if not isinstance(fn, str):
            # transformers has no public unregister: the registry is a class-level mapping
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)
