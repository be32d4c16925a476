"""The layer kinds a weight adapter can wrap, seen through one convention: W0 is [out, in].

``nn.Linear`` stores [out, in]. GPT-2's ``Conv1D`` stores [in, out] (y = x W + b). An
``nn.Embedding`` [num_embeddings, dim] is read as a linear map from one-hot ids, so its
canonical weight is [dim, num_embeddings] (LoRA's embedding A is [r, num_embeddings], B
is [dim, r]). Every update and reparam works on the canonical view; only this module knows
the storage layouts.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers is a dependency, but keep the core importable without it for tooling
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


_PLAIN_LAYERS = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"embedding"``, or ``None`` for a module no weight adapter wraps."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def called_plainly(module: nn.Module) -> bool:
    """True when ``module(x)`` is exactly ``x W0ᵀ + b``, so a fused adapter may compute it by hand.

    An ``nn.Linear`` or ``Conv1D`` itself (a subclass may do more in its forward) with no forward
    hooks or pre-hooks (accelerate's offloading, user hooks): anything else must be called as
    the module it is.
    """
    return (type(module) in _PLAIN_LAYERS and not module._forward_hooks
            and not module._forward_pre_hooks)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The canonical weight W0 [out, in] of ``module`` (a view, no copy)."""
    kind = layer_kind(module)
    if kind == "linear":
        return module.weight
    if kind in ("conv1d", "embedding"):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} has no weight modapt can adapt")


def to_storage(module: nn.Module, canonical: torch.Tensor) -> torch.Tensor:
    """The tensor laid out as ``module.weight`` stores it, from a canonical [out, in] one."""
    return canonical if layer_kind(module) == "linear" else canonical.t()


def dims_of(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the canonical weight."""
    out_f, in_f = weight_of(module).shape
    return int(out_f), int(in_f)


def linear_apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a canonical weight [out, in] to ``x`` the way ``module`` applies its own, without bias.

    For embeddings ``x`` holds ids [...] and the result is [..., dim]; otherwise ``x`` is
    [..., in] and the result [..., out].
    """
    if layer_kind(module) == "embedding":
        return embed(module, x, weight.t())
    return torch.nn.functional.linear(x, weight)


def embed(module: nn.Embedding, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Look ``ids`` up in ``table`` [num_embeddings, k] with the embedding's own options.

    ``padding_idx`` matters only for gradients (its row gets none), exactly as for the base.
    """
    return torch.nn.functional.embedding(
        ids,
        table,
        padding_idx=module.padding_idx,
        max_norm=module.max_norm,
        norm_type=module.norm_type,
        scale_grad_by_freq=module.scale_grad_by_freq,
        sparse=module.sparse,
    )
