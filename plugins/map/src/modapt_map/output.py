"""The MAP layer output with one base matmul in the forward and one in the backward.

    y [..., out] = base_out + (a − 1)·(W0 x) + b·u,   W0 x = base_out − bias,  u = ΔW x

with a = α/‖W0‖_F and b = β/‖ΔW‖_F (0-dim). Plain autograd would keep ``W0 x`` [..., out]
alive for a's gradient ⟨g, W0 x⟩, an activation LoRA does not store. This function gets it
from the gradient of the input instead: ⟨g, W0 x⟩ = ⟨g W0, x⟩, and g W0 [..., in] is the
product the backward computes anyway for x's gradient (a · g W0). It stores x (the tensor
LoRA's A already stores, so no new memory when there is no dropout) and u in the output's
dtype (for b's gradient ⟨g, u⟩).

On a quantized base the "output's dtype" is the layer's compute dtype (bf16 for QLoRA), not
the dtype of ``base_out``: k-bit preparation keeps the hidden states in float32 and
bitsandbytes returns W0 x in the input's dtype, so keying on ``base_out`` would store u and
form g W0 in float32 (a full-size float32 GEMM per layer and step, where bitsandbytes' own
backward works in the compute dtype; profiled at 1.71 × PEFT QLoRA's step, see
docs/performance.md).
"""

from __future__ import annotations

import torch
from modapt import layers, quantized
from torch import nn


class MapOutput(torch.autograd.Function):
    """``MapOutput.apply(x, u, a, b, base_out, base_layer, bias)`` -> y; ``base_out`` is detached
    (a value); ``bias`` is the base layer's (or None), an input so that a trainable bias gets
    its gradient (g summed over tokens)."""

    @staticmethod
    def forward(ctx, x, u, a, b, base_out, base_layer, bias):
        w0_x = base_out if bias is None else base_out - bias
        dtype = base_out.dtype
        low = quantized.compute_dtype(base_layer) if layers.is_quantized(base_layer) else dtype
        # base_out + (a − 1)·W0x rather than a·W0x + bias: a = 1, β = 0 is the base bit for bit;
        # fused multiply-adds, one pass over [..., out] each
        y = torch.addcmul(base_out, w0_x, (a - 1).to(dtype))
        # a float32 update on a bf16 base: addcmul_ computes b·u in float32 and rounds once
        # into y, one pass (no float32 temporary, no separate cast)
        y.addcmul_(u, b if u.dtype != dtype else b.to(dtype))
        u_low = u.to(low)
        ctx.save_for_backward(x, u_low, a, b)
        ctx.base_layer = base_layer
        ctx.u_dtype = u.dtype
        ctx.low = low
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, u_low, a, b = ctx.saved_tensors
        base = ctx.base_layer
        w0 = layers.weight_of(base)
        grad_x = grad_a = None
        acc = torch.promote_types(g.dtype, torch.float32)  # sums of bf16 products accumulate in fp32
        if layers.layer_kind(base) == "embedding":
            if ctx.needs_input_grad[2]:
                w0_x = layers.embed(base, x, w0.t().to(g.dtype))  # a lookup, recomputed: cheap
                grad_a = inner(g, w0_x, acc)
        elif ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            low = ctx.low  # g's dtype, or a quantized layer's compute dtype (see the module header)
            g_w0 = g.to(low) @ w0.to(low)  # [..., in]: the base path's input gradient, before the factor a
            if ctx.needs_input_grad[2]:
                grad_a = inner(g_w0, x.to(g_w0.dtype), acc)
            if ctx.needs_input_grad[0]:
                grad_x = g_w0.mul_(a.to(g_w0.dtype)).to(x.dtype)
        grad_u = (g * b.to(g.dtype)).to(ctx.u_dtype) if ctx.needs_input_grad[1] else None
        grad_b = inner(g, u_low, acc) if ctx.needs_input_grad[3] else None
        grad_bias = None
        if ctx.needs_input_grad[6]:
            grad_bias = g.reshape(-1, g.shape[-1]).sum(dim=0, dtype=acc).to(ctx.bias_dtype)
        return (grad_x, grad_u,
                None if grad_a is None else grad_a.to(a.dtype),
                None if grad_b is None else grad_b.to(b.dtype), None, None, grad_bias)


def inner(p: torch.Tensor, q: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """⟨p, q⟩ (0-dim, dtype ``acc``): a dot product without a temporary when no cast is needed."""
    if p.dtype == acc and q.dtype == acc:
        return torch.dot(p.reshape(-1), q.reshape(-1))
    return (p * q).sum(dtype=acc)


def map_output(x: torch.Tensor, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base_out: torch.Tensor,
               base_layer: nn.Module) -> torch.Tensor:
    """y = base_out + (a − 1)·(base_out − bias) + b·u, differentiable in x, u, a and b.

    ``base_out`` [..., out] is the base layer's output for ``x``; its own autograd graph (if an
    update used it) is left to the update: here it is a value only.
    """
    return MapOutput.apply(x, u, a, b, base_out.detach(), base_layer, getattr(base_layer, "bias", None))
