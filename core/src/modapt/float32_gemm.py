"""Half-precision GEMMs with a float32 result in one kernel, where the device has them.

``torch.mm(p, q, out_dtype=torch.float32)`` multiplies bf16/fp16 operands into a float32
result (CUDA): the products of half values are exact in float32 and the sums are float32, the
numbers of a float32 GEMM over upcast copies, without writing those copies and on the half
tensor cores. CPUs have no such kernel (``NotImplementedError``); the first refusal is
remembered per device type, so later calls go straight to the caller's fallback.
"""

from __future__ import annotations

import torch

# device type -> whether the float32-output GEMM ran there (absent: not tried yet)
_AVAILABLE: dict[str, bool] = {}


def mm_float32(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
    """p q [n, m] float32 from half p [n, k] and q [k, m] in one GEMM, or ``None`` where the
    device lacks it (the caller then multiplies and casts). ``None`` under torch.compile too,
    whose graph fuses the fallback's cast (and would break at the memo's write)."""
    if torch.compiler.is_compiling():
        return None
    device = p.device.type
    if _AVAILABLE.get(device) is False:
        return None
    try:
        out = torch.mm(p, q, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
        _AVAILABLE[device] = False
        return None
    if device not in _AVAILABLE:
        _AVAILABLE[device] = True
    return out


def available(device_type: str) -> bool | None:
    """Whether :func:`mm_float32` ran on this device type (``None``: not tried yet)."""
    return _AVAILABLE.get(device_type)
