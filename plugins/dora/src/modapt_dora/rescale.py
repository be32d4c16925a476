"""DoRA's output as one autograd node: ``y = c + s ⊙ (a + Δ)``, keeping one tensor for the backward.

Shapes: ``a`` [..., out] the base term in the base dtype (``W0 x`` plus the bias, or
``W0 x̃`` on the dropout path), ``Δ`` [..., out] the update's output in its own dtype (float32
over a bfloat16 base), ``s = m / ‖W0 + ΔW‖_row`` [out] float32, ``c`` [out] or [..., out]
or ``None``.

Written with plain autograd, ``c + s * (a + Δ)`` keeps ``a + Δ`` in float32 (type promotion
with a float32 Δ) and runs four elementwise kernels over [..., out]. Here the forward runs two
(``u = a + Δ`` rounded once to the base dtype, then ``y = c + s ⊙ u`` computed in float32 and
rounded once), and the backward keeps only ``u`` in the base dtype (needed by ∂L/∂s = Σ g ⊙ u)
and ``s``: the one activation DoRA adds to LoRA.
"""

from __future__ import annotations

import torch


class _Rescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, delta, scale, shift):
        u = torch.empty_like(a)
        torch.add(a, delta, out=u)  # computed in the promoted dtype, rounded once to a's
        y = torch.empty_like(a)
        if shift is None:
            torch.mul(u, scale, out=y)
        else:
            torch.addcmul(shift, scale, u, out=y)
        ctx.save_for_backward(u, scale)
        ctx.delta_dtype = delta.dtype
        ctx.shift_shape = None if shift is None else shift.shape
        ctx.shift_dtype = None if shift is None else shift.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        u, scale = ctx.saved_tensors
        need_a, need_delta, need_scale, need_shift = ctx.needs_input_grad
        grad_a = grad_delta = grad_scale = grad_shift = None
        if need_a:
            grad_a = torch.empty_like(grad)
            torch.mul(grad, scale, out=grad_a)
        if need_delta:
            if need_a and ctx.delta_dtype == grad.dtype:
                grad_delta = grad_a
            else:  # straight to Δ's dtype: g ⊙ s is not rounded to the base dtype first
                grad_delta = torch.empty(grad.shape, dtype=ctx.delta_dtype, device=grad.device)
                torch.mul(grad, scale, out=grad_delta)
        if need_scale:
            # Σ over tokens of g ⊙ u, accumulated in float32
            grad_scale = (grad * u).reshape(-1, u.shape[-1]).sum(dim=0, dtype=torch.float32).to(scale.dtype)
        if need_shift:
            grad_shift = grad
            if tuple(ctx.shift_shape) != tuple(grad.shape):
                grad_shift = grad.reshape(-1, grad.shape[-1]).sum(dim=0, dtype=torch.float32)
                grad_shift = grad_shift.reshape(ctx.shift_shape)
            grad_shift = grad_shift.to(ctx.shift_dtype)
        return grad_a, grad_delta, grad_scale, grad_shift


def rescale(a: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``shift + scale ⊙ (a + delta)`` in ``a``'s dtype; see the module docstring for shapes.

    ``shift`` [out] broadcasts over the leading dimensions (the bias term), or has ``a``'s
    shape (the dropout path); ``None`` means zero.
    """
    return _Rescale.apply(a, delta, scale, shift)
