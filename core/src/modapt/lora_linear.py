"""LoRA on a linear layer as one autograd node: ``y = W0 x + b + s · B (A x)``.

Where per-layer overhead rather than arithmetic sets the step time (small models, short
sequences: the SmolLM2-135M regime of issue 25), each kernel and each autograd node counts.
Through modules and autograd, a LoRA layer costs five forward kernels (base, A, B, the scale,
the sum), each input cast twice under autocast (once per consumer), and seven backward kernels
over six graph nodes. Here the forward is three GEMMs (the scale and the sum ride on the last
one: ``addmm(W0 x + b, A x, Bᵀ, alpha=s)``), the input is cast once, and the backward is five
GEMMs (``s`` again as GEMM alpha), one node. The cast input is stored once, not twice.

Numerics: the same products in the same precision as the module path; the sum ``W0 x + s·BAx``
is rounded once (inside the GEMM's epilogue) instead of after each of the scale and the add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LoraLinear(torch.autograd.Function):
    """``LoraLinear.apply(x, w0, bias, a, b, scaling, dtype)`` -> y [..., out].

    x [..., in]; w0 [out, in] (frozen); bias [out] or None (frozen); a [r, in]; b [out, r];
    ``dtype``: the compute dtype (autocast's, or the common dtype of all operands).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, a, b, scaling, dtype):
        # operands are cast explicitly, so autocast (if on) finds nothing left to cast
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        if w0.dtype != dtype:
            w0 = w0.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        ac, bc = a.to(dtype), b.to(dtype)
        h = torch.mm(x2, ac.t())                                          # [N, r]
        y = torch.addmm(F.linear(x2, w0, bias), h, bc.t(), alpha=scaling)  # W0 x + b + s·B(Ax)
        ctx.save_for_backward(x2, w0, ac, bc, h)
        ctx.scaling = scaling
        ctx.x_meta = (x.shape, x.dtype, a.dtype, b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, w0, ac, bc, h = ctx.saved_tensors
        s = ctx.scaling
        shape, x_dtype, a_dtype, b_dtype = ctx.x_meta
        g2 = g.reshape(-1, g.shape[-1])
        if g2.dtype != x2.dtype:
            g2 = g2.to(x2.dtype)
        need = ctx.needs_input_grad
        # beta = 0: the first argument only gives the shape, its values are ignored
        gh = torch.addmm(h, g2, bc, beta=0, alpha=s)                      # s·g B      [N, r]
        grad_b = torch.addmm(bc, g2.t(), h, beta=0, alpha=s).to(b_dtype) if need[4] else None
        grad_a = torch.mm(gh.t(), x2).to(a_dtype) if need[3] else None
        grad_x = torch.addmm(torch.mm(g2, w0), gh, ac).view(shape).to(x_dtype) if need[0] else None
        return grad_x, None, None, grad_a, grad_b, None, None
