"""DoRA over LoRA on a linear layer as one autograd node: a handful of kernels per step.

    y [N, out] = s ⊙ u + b,   u = W0 x + h Lᵀ,   h = x Aᵀ [N, r],   s = m / ‖W0 + L A‖_row [out]

with x [N, in] (leading dimensions flattened), W0 [out, in] the frozen base weight, b [out] its
bias (or none), A = ``lora_A.weight`` [r, in], B = ``lora_B.weight`` [out, r], L = c·B [out, r]
(c = LoRA's scaling, ``addmm``'s alpha: never a kernel of its own), m = ``lora_magnitude_vector`` [out], and ‖W0 + L A‖_row [out] the detached
row norm, computed by the caller (DoRA §4.3: a constant of the step).

At the SmolLM2-135M shape the GPU step is bound by the CPU issuing kernels, so the number of
ops per adapted layer is the cost. Written with autograd (base layer, LoRA, the rescale) the
forward and backward of one layer dispatch ~200 aten calls and build ~10 autograd nodes. Here
the forward is 5 kernels (W0 x, x Aᵀ, u = W0 x + c·h Bᵀ as one ``addmm``, s, s ⊙ u) and the
backward 8 (g ⊙ s, g ⊙ u and its sum over tokens, its division by the norm, (g s) B, c·(g s)ᵀ h,
c·((g s) B)ᵀ x, and the input gradient (g s) W0 + c·((g s) B) A as an ``mm`` and an in-place
``addmm_``), in one autograd node.

Kept for the backward: x (the tensor LoRA's A keeps anyway), h [N, r] (LoRA keeps it too),
u [N, out] in the base dtype (the one activation DoRA adds: ∂L/∂m = Σ_N g ⊙ u / ‖·‖_row needs it),
and W0 in the compute dtype (under autocast the bf16 copy plain autograd keeps too).

Dtypes, as the unfused path and PEFT compute them:

* no autocast: the base product in W0's dtype, the adapter's in A's (x is cast to it, as
  LoRA does: float32 adapter over a bf16 base), u = W0 x + h Lᵀ summed in the wider dtype and
  rounded once to the base dtype, y = s ⊙ u + b computed in float32 and rounded once;
* autocast (dtype ac): x, W0, A, B are cast to ac once, every product runs in ac.
"""

from __future__ import annotations

import torch
from modapt.one_kernel import constant, mul_to, promoted


def _scaled_mm(p: torch.Tensor, q: torch.Tensor, c: float) -> torch.Tensor:
    """c · p q [n, m] in one kernel, from p [n, k] and q [k, m]."""
    return torch.addmm(constant(0.0, p), p, q, beta=0, alpha=c)


class DoraLora(torch.autograd.Function):
    """``DoraLora.apply(x, A, B, m, w0, bias, norm, scaling, compute_dtype)`` -> y [..., out].

    ``norm`` [out] float32 is a detached value (the caller computed it); ``scaling`` is c (a
    float, folded into the products as ``addmm``'s alpha); ``compute_dtype`` is the autocast
    dtype or ``None``. Gradients flow to x, A, B and m; W0 and the bias are frozen.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, magnitude, w0, bias, norm, scaling, compute_dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if compute_dtype is not None:  # autocast: every product in its dtype
            xb = xa = x2.to(compute_dtype)
            w0c, ac, bc = w0.to(compute_dtype), lora_a.to(compute_dtype), lora_b.to(compute_dtype)
        else:
            xb, w0c, ac, bc = x2, w0, lora_a, lora_b
            xa = x2 if x2.dtype == lora_a.dtype else x2.to(lora_a.dtype)
        base = torch.mm(xb, w0c.t())  # W0 x [N, out], no bias
        h = torch.mm(xa, ac.t())  # [N, r]
        if h.dtype == base.dtype:
            u = torch.addmm(base, h, bc.t(), alpha=scaling)  # W0 x + c·h Bᵀ
        else:  # float32 adapter over a half base: summed in float32, rounded once
            u = torch.add(base, _scaled_mm(h, bc.t(), scaling), out=base)
        scale = magnitude / norm  # [out] float32
        if bias is None and promoted(u.dtype, scale.dtype) == u.dtype:
            y = u * scale
        else:
            y = torch.empty_like(u)
            if bias is None:
                torch.mul(u, scale, out=y)
            else:
                torch.addcmul(bias, u, scale, out=y)
        ctx.save_for_backward(xa, h, u, scale, w0c, ac, bc, norm)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.x_dtype = x.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xa, h, u, scale, w0c, ac, bc, norm = ctx.saved_tensors
        need_x, need_a, need_b, need_m = ctx.needs_input_grad[:4]
        c = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gs = mul_to(g, scale, bc.dtype)  # ∂L/∂u = g ⊙ s, in the adapter's dtype
        grad_x = grad_a = grad_b = grad_m = None
        if need_m:
            prod = g * u
            gu = prod.sum(dim=0) if prod.dtype == torch.float32 else prod.sum(dim=0, dtype=torch.float32)
            grad_m = gu / norm  # ∂L/∂m = Σ_N g ⊙ u / ‖·‖_row
        gs_b = torch.mm(gs, bc) if (need_x or need_a) else None  # (g ⊙ s) B [N, r]; ∂L/∂h = c·(g ⊙ s) B
        if need_b:
            grad_b = _scaled_mm(gs.t(), h, c)  # [out, r]
        if need_a:
            grad_a = _scaled_mm(gs_b.t(), xa, c)  # [r, in]
        if need_x:
            gs_base = gs if gs.dtype == w0c.dtype else gs.to(w0c.dtype)
            grad_x = torch.mm(gs_base, w0c)  # [N, in]
            if gs_b.dtype == grad_x.dtype:
                grad_x.addmm_(gs_b, ac, alpha=c)
            else:  # the adapter's part rounded to the base dtype first, as autograd's cast back does
                grad_x.add_(_scaled_mm(gs_b, ac, c).to(grad_x.dtype))
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_a, grad_b, grad_m, None, None, None, None, None
