"""Small ops in the fewest kernels and host calls, for the fused autograd nodes of the plugins.

Where the host issuing kernels sets the step time (the 135M shape, and the ~1B shape for
LoMAP and DoRA on the H200), each aten call of a fused layer counts. These are the pieces the
nodes share: a memoised dtype promotion (``torch.promote_types`` is an aten call of its own),
0-dim constants made once per device and dtype, and a product written directly in a narrower
dtype (one kernel where a product and a cast are two).

The memos are not written under torch.compile: dynamo does not trace a write to a
module-level dict and would break the graph at every layer; there the calls cost nothing at
run time anyway (inductor folds constants and casts).
"""

from __future__ import annotations

import torch

_PROMOTED: dict[tuple[torch.dtype, torch.dtype], torch.dtype] = {}
_CONSTANTS: dict[tuple[float, torch.device, torch.dtype], torch.Tensor] = {}


def promoted(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types(a, b)``, memoised."""
    if torch.compiler.is_compiling():
        return torch.promote_types(a, b)
    key = (a, b)
    if key not in _PROMOTED:
        _PROMOTED[key] = torch.promote_types(a, b)
    return _PROMOTED[key]


def constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim ``value`` of ``like``'s device and dtype, made once (e.g. the ignored input of
    ``addmm(_, p, q, beta=0, alpha=c)``, or the −1 of ``addcdiv(−1, α, ‖W0‖)``)."""
    if torch.compiler.is_compiling():
        return torch.full((), value, device=like.device, dtype=like.dtype)
    key = (value, like.device, like.dtype)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = _CONSTANTS[key] = torch.full((), value, device=like.device, dtype=like.dtype)
    return tensor


def mul_to(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x ⊙ scale computed in the promoted dtype and written in ``dtype``: one kernel (``mul``
    with an ``out`` of the narrower dtype rounds once)."""
    if promoted(x.dtype, scale.dtype) == dtype:
        return x * scale
    return torch.mul(x, scale, out=torch.empty(x.shape, dtype=dtype, device=x.device))
