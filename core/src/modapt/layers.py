"""The layer kinds a weight adapter can wrap, seen through one convention: W0 is [out, in].

``nn.Linear`` stores [out, in]. GPT-2's ``Conv1D`` stores [in, out] (y = x W + b). An
``nn.Embedding`` [num_embeddings, dim] is read as a linear map from one-hot ids, so its
canonical weight is [dim, num_embeddings] (LoRA's embedding A is [r, num_embeddings], B
is [dim, r]). Every update and reparam works on the canonical view; only this module knows
the storage layouts.

Quantized linear layers (bitsandbytes 4/8-bit, torchao) are ``"linear"`` too; their kind
(:mod:`modapt.quantized`) gives the dims from the module and W0 by dequantizing, so
``weight_of`` returns a new float tensor for them, not a view, and ``called_plainly`` is False
(their weight is not a plain tensor: only the module's own call computes W0·x).
"""

from __future__ import annotations

import torch
from torch import nn

from . import quantized

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

    An ``nn.Linear`` or ``Conv1D`` itself (a subclass may do more in its forward) whose weight
    is a plain floating tensor (not packed, not a torchao subclass: decided from the weight),
    with no forward hooks or pre-hooks (accelerate's offloading, user hooks): anything else
    must be called as the module it is.
    """
    return (type(module) in _PLAIN_LAYERS and not module._forward_hooks and not module._forward_pre_hooks
            and has_plain_weight(module))


def has_plain_weight(module: nn.Module) -> bool:
    """True when ``module.weight`` is a plain floating tensor a matmul may use as W0 (not packed,
    not a tensor subclass): the condition of every fast path that multiplies by W0 itself."""
    weight = _weight(module)
    if type(weight) is nn.Parameter or type(weight) is torch.Tensor:  # the common case, in ~0.1 µs
        return weight.is_floating_point()
    return isinstance(weight, torch.Tensor) and quantized.is_plain_tensor(weight)


def _weight(module: nn.Module):
    # the parameter dict first: nn.Module.__getattr__ costs more than the rest of these checks
    weight = module._parameters.get("weight")
    return weight if weight is not None else getattr(module, "weight", None)


def is_quantized(module: nn.Module) -> bool:
    """True for a linear layer of a quantized kind (:mod:`modapt.quantized`)."""
    return _quantized_kind(module) is not None


def _quantized_kind(module: nn.Module):
    # a plain floating weight is never quantized: one type check, so that the per-call readers
    # below (fused paths read W0 every step) pay nothing measurable on a float model
    weight = _weight(module)
    if (type(weight) is nn.Parameter or type(weight) is torch.Tensor) and weight.is_floating_point():
        return None
    return quantized.kind_of(module)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The canonical weight W0 [out, in] of ``module`` (a view, no copy).

    For a quantized layer: W0 dequantized, a new floating tensor each call (one
    dequantization of the layer: callers that need it every step say so in their README).
    """
    if _quantized_kind(module) is not None:
        return quantized.dequantize(module)
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
    """(out, in) of the canonical weight (a quantized layer's from the module: its stored
    tensor is packed)."""
    if _quantized_kind(module) is not None:
        return int(module.out_features), int(module.in_features)
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


def w0_apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W0 x [..., out] without bias for x [..., in]; a quantized layer computes it by its own call."""
    if _quantized_kind(module) is not None:
        out = module(x)
        bias = getattr(module, "bias", None)
        return out - bias.to(out.dtype) if bias is not None else out
    return linear_apply(module, x, weight_of(module))


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
