"""Which modules LMAM can adapt: self-attention modules that dispatch through transformers'
attention interface (LLaMA/Qwen/Mistral-style ``*Attention``, ``GPT2Attention``,
``BertSelfAttention``...)."""

from __future__ import annotations

import inspect
from functools import lru_cache

from torch import nn


@lru_cache(maxsize=None)
def _dispatches_through_interface(cls: type) -> bool:
    """The class's ``forward`` looks its attention function up in ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def is_self_attention(module: nn.Module) -> bool:
    """A self-attention module of a transformers 5 model that LMAM can hook (cross-attention excluded)."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return False
    if getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__:
        return False
    return _dispatches_through_interface(type(module))


def attention_modules(model: nn.Module) -> list[str]:
    """Names of every self-attention module of ``model`` (LMAM's default targets), in model order."""
    return [name for name, module in model.named_modules() if name and is_self_attention(module)]


def query_heads(module: nn.Module) -> int:
    """h, the module's number of query heads (``num_attention_heads``; grouped-query KV heads do not matter)."""
    for owner, key in ((module, "num_heads"), (module.config, "num_attention_heads"), (module, "num_attention_heads")):
        value = getattr(owner, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the number of attention heads of {type(module).__name__}")
