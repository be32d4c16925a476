"""A ``torch.mm`` that takes ``out_dtype`` as CUDA's does, or refuses it as a CPU's does.

The float32-output GEMM paths (:mod:`modapt.float32_gemm`) run on CUDA only; a test on a CPU
swaps in this ``torch.mm`` to run the same code either way.
"""

from __future__ import annotations

import torch


def emulate_float32_mm(monkeypatch, supported: bool) -> list[torch.dtype]:
    """Patch ``torch.mm`` for the test: ``out_dtype=float32`` computes the product of the float32
    copies (bf16 products are exact in float32) when ``supported``, else raises as a CPU does.
    The memo of :mod:`modapt.float32_gemm` is emptied so the path is tried afresh. Returns the list
    the patched call appends each ``out_dtype`` it is asked for to."""
    from modapt import float32_gemm

    real_mm = torch.mm
    calls: list[torch.dtype] = []

    def mm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real_mm(a, b)
        calls.append(out_dtype)
        if not supported:
            raise NotImplementedError("aten::mm.dtype is not available on this backend")
        return real_mm(a.to(out_dtype), b.to(out_dtype))

    monkeypatch.setattr(float32_gemm, "_AVAILABLE", {})
    monkeypatch.setattr(torch, "mm", mm)
    return calls
