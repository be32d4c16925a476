"""MAP over a factored update (ΔW = L R) on a linear layer, as one autograd node.

    y [N, out] = W0 x + bias + (a − 1)·(W0 x) + b·(h Lᵀ),   h = x Rᵀ [N, k]

with x [N, in] (leading dimensions flattened), W0 [out, in] the frozen base weight (canonical:
GPT-2's Conv1D is read through its transpose), L [out, k] and R [k, in] the update's
``factors()`` (LoRA: L = s·B, R = A; AdaLoRA: L = P·diag(Λ)·c, R = Q), a = α/‖W0‖_F and
b = β/max(‖ΔW‖_F, eps) (0-dim float32, computed here from the closed form
‖ΔW‖² = sum((LᵀL) ⊙ (R Rᵀ)), k×k work, with its backward written out). Gradients reach the
update's parameters through ``factors()`` by autograd.

Why one node. The general path (:mod:`modapt_map.output`) receives u = ΔW x [N, out] from the
update's forward and has to store it for β's gradient ⟨g, u⟩; over a float32 update on a
bf16 base, u is also a float32 [N, out] tensor, written, read, cast and read again. With the
factors in hand, every product MAP's backward needs has a thin form:

* ⟨g, u⟩ = ⟨g L, h⟩, with g L [N, k] the product R's gradient needs anyway;
* ⟨g, W0 x⟩ = ⟨g W0, x⟩, with g W0 [N, in] the input gradient's own product (as before).

So the node stores only x and h (what LoRA stores) and never forms u.

Forward: 3 GEMMs (W0 x + bias, h = x Rᵀ, and h (b·L)ᵀ accumulated into y by ``addmm_``) and one
pass over [N, out] (the (a − 1) term, written as a correction so that a = 1, β = 0 is the base
output bit for bit). Backward: 5 GEMMs (g W0, g L, gᵀ h, (g L)ᵀ x, and (g L)(b·R) accumulated
into the input gradient), two dot products and one scaling pass over [N, in]; b is folded into
the k-wide factors, never applied to an [N, ·] tensor. Stored: x (cast to the compute dtype),
h, W0 in the compute dtype (a view unless autocast casts it), L, and k×k and 0-dim tensors.

Dtypes. Every product with an [N, ·] operand runs in one compute dtype ``dtype``: autocast's
when autocast is on, else the base's (x must then have the base's dtype). The thin operands
(L, R, b·L, b·R: [out, k], [k, in]) are cast to it, never x, g or the output: over a float32
update on a bf16 base, this is what autocast would compute (bf16 operands, fp32 accumulation
inside the GEMMs), and it avoids every float32 [N, out] and [N, in] pass the module path makes
(casting x up, u, g cast up for the update's backward). The parameter gradients are returned
in the parameters' dtype and scaled by b there. With one dtype throughout (float32, or a
model converted whole to bf16) the node computes the same products as the general path, up to
summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from modapt import Update, fast_path_switches, layers
from modapt.float32_gemm import mm_float32
from modapt.one_kernel import constant, mul_to
from modapt.tracing import exporting
from torch import nn

from .output import inner

def compute_dtype(x: torch.Tensor, host: nn.Module, update: Update) -> torch.dtype | None:
    """The dtype the fused node would compute in for input ``x``, or ``None``: the general path.

    Fused when: the graph is not being exported (torch.export, ONNX and jit tracing keep the
    general path's plain ops; torch.compile traces the node's forward and backward), the base is a plain
    ``nn.Linear``/``Conv1D`` called as such (:func:`modapt.layers.called_plainly`) with a frozen weight
    (the bias may train: its gradient is the sum of g over tokens), the
    update declares ``fused_low_rank`` (:class:`modapt.Update`: ``forward(x)`` is exactly
    ``dropout(x) Rᵀ Lᵀ`` with cheap ``factors()``), and its ``input_dropout`` is inactive (p = 0 or eval
    mode: with dropout, R's gradient needs the dropped x and the base path the plain one, and
    storing both would cost more than the general path saves; dropout > 0 in training keeps it).
    """
    # modapt.fast_paths(map_one_node=False) sends every layer through the general path (measurements)
    if not fast_path_switches.current.map_one_node or not x.is_floating_point() or exporting():
        return None
    base = host.base_layer
    if not layers.called_plainly(base):
        return None
    if not update.fused_low_rank:
        return None
    if base.weight.requires_grad:
        return None
    dropout = update.input_dropout
    if dropout is not None and not isinstance(dropout, nn.Identity) and dropout.training:
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype != base.weight.dtype:
        return None
    return x.dtype


class MapFactored(torch.autograd.Function):
    """``MapFactored.apply(x, w0, bias, left, right, alpha, beta, w0_norm, eps, dtype)`` -> y [..., out].

    x [..., in]; w0 [out, in] (frozen); bias [out] or None; left L [out, k]; right R [k, in];
    alpha, beta 0-dim parameters; w0_norm ‖W0‖_F (0-dim float32 buffer); eps the floor of ‖ΔW‖;
    ``dtype`` the compute dtype (see the module docstring). Gradients flow to x, the bias, L, R,
    α and β.

    The magnitudes are computed here too: a = α/‖W0‖ and b = β/max(‖ΔW‖, eps) with
    ‖ΔW‖² = ⟨LᵀL, R Rᵀ⟩, the contract's closed form (k×k work, in the factors' dtype),
    and their backward is written out. Every aten call counts: on large shapes the eager step
    is bound by the host issuing ops (README, "Measurement history"), so no call is made that returns its input
    (``.to`` of the same dtype), 0-dim operands enter the kernels as they are (a float32 0-dim
    tensor beside a bf16 [N, ·] one is rounded to bf16 inside the kernel, as ``.to`` would), and
    the reductions use the k-wide products already at hand (⟨g L, h⟩ = ⟨L, gᵀh⟩).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, left, right, alpha, beta, w0_norm, eps, dtype):
        factor_dtype = left.dtype
        if torch.is_autocast_enabled(x.device.type):  # k×k work in the factors' own dtype
            with torch.autocast(x.device.type, enabled=False):
                gram_left, gram_right, sq = _grams(left, right)
        else:
            gram_left, gram_right, sq = _grams(left, right)
        sq_floor = sq.clamp_min(eps * eps)
        norm = sq_floor.sqrt()
        b = beta / norm
        am1 = torch.addcdiv(constant(-1.0, alpha), alpha, w0_norm)  # a − 1 = α/‖W0‖ − 1
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)  # cast once, for the base and the update alike; stored cast
        w0c = w0 if w0.dtype == dtype else w0.to(dtype)
        bias_c = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
        right_c = right if factor_dtype == dtype else right.to(dtype)
        y = F.linear(x2, w0c, bias_c)  # W0 x + bias: the base layer's output [N, out]
        # (a − 1) enters rounded to the compute dtype, not a: its rounding error then scales the
        # correction only, and a = 1 adds exactly 0
        if bias is None:
            y.addcmul_(y, am1)
        else:
            y = torch.addcmul(y, y - bias_c, am1)
        h = F.linear(x2, right_c)  # x Rᵀ [N, k]
        y.addmm_(h, mul_to(left, b, dtype).t())  # + b·h Lᵀ, b·L rounded once to the compute dtype
        ctx.save_for_backward(x2, h, w0c, left, right, gram_left, gram_right, sq, sq_floor, norm, am1, b, w0_norm)
        ctx.meta = (shape, x.dtype, None if bias is None else bias.dtype, eps * eps)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        if torch.is_autocast_enabled(grad.device.type):  # backward called inside an autocast region:
            with torch.autocast(grad.device.type, enabled=False):  # the k×k work stays in the factors' dtype
                return MapFactored._backward(ctx, grad)
        return MapFactored._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x2, h, w0c, left, right, gram_left, gram_right, sq, sq_floor, norm, am1, b, w0_norm = ctx.saved_tensors
        shape, x_dtype, bias_dtype, eps_sq = ctx.meta
        need_x, _, need_bias, need_left, need_right, need_alpha, need_beta = ctx.needs_input_grad[:7]
        dtype = x2.dtype
        factor_dtype = left.dtype
        g = grad.reshape(-1, grad.shape[-1])
        if g.dtype != dtype:
            g = g.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # sums of half products accumulate in fp32
        grad_x = grad_bias = grad_left = grad_right = grad_alpha = grad_beta = None
        if need_bias:
            grad_bias = g.sum(dim=0, dtype=acc).to(bias_dtype)
        need_update = need_left or need_right or need_beta
        g_left = None
        if need_x or need_right:
            g_left = torch.mm(g, left if factor_dtype == dtype else left.to(dtype))  # g L [N, k]
        if need_update:
            # ∂L/∂L's data term gᵀh [out, k]; ∂L/∂b = ⟨g, h Lᵀ⟩ = ⟨L, gᵀh⟩ (out×k work, not N×k)
            g_h = _mm_to(g.t(), h, factor_dtype)
            grad_b = torch.dot(left.reshape(-1), g_h.reshape(-1))
            if need_beta:
                grad_beta = grad_b / norm
            # ∂L/∂(‖ΔW‖²)·2 = −∂L/∂b · b/‖ΔW‖² (0 below the floor), times L (R Rᵀ) and (LᵀL) R
            coef = torch.where(sq >= eps_sq, grad_b * b / sq_floor, 0.0)
            if need_left:  # b · gᵀh − coef · L (R Rᵀ)   [out, k]
                grad_left = g_h.mul_(b).addcmul_(left @ gram_right, coef, value=-1)
            if need_right:  # b · (g L)ᵀ x − coef · (LᵀL) R   [k, in]
                g_x = _mm_to(g_left.t(), x2, factor_dtype)
                grad_right = g_x.mul_(b).addcmul_(gram_left @ right, coef, value=-1)
        if need_x or need_alpha:
            g_w0 = torch.mm(g, w0c)  # [N, in]: the base path's input gradient before the factor a
            if need_alpha:
                grad_alpha = inner(g_w0, x2, acc) / w0_norm  # ⟨g, W0 x⟩/‖W0‖ = ⟨g W0, x⟩/‖W0‖
            if need_x:
                # a·g W0 + b·(g L) R, a as 1 + (a − 1) for the forward's reason: a rounded to bf16
                # would scale the whole input gradient by up to 1 ± 2⁻⁹, (a − 1) rounded only its correction
                grad_x = g_w0.addcmul_(g_w0, am1).addmm_(g_left, mul_to(right, b, dtype))
                grad_x = grad_x.view(shape)
                if grad_x.dtype != x_dtype:
                    grad_x = grad_x.to(x_dtype)
        return grad_x, None, grad_bias, grad_left, grad_right, grad_alpha, grad_beta, None, None, None


def _grams(left: torch.Tensor, right: torch.Tensor):
    """(LᵀL [k, k], R Rᵀ [k, k], ‖L R‖_F² = ⟨LᵀL, R Rᵀ⟩ 0-dim, at least float32)."""
    gram_left = torch.mm(left.t(), left)
    gram_right = torch.mm(right, right.t())
    if gram_left.dtype in (torch.float32, torch.float64):
        sq = torch.dot(gram_left.reshape(-1), gram_right.reshape(-1))
    else:
        sq = (gram_left * gram_right).sum(dtype=torch.float32)
    return gram_left, gram_right, sq


def _mm_to(p: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """p q in ``dtype`` (a factor's gradient [out, k] or [k, in]). Half operands with a float32
    result: one GEMM with float32 output where the device has it (:func:`modapt.float32_gemm.mm_float32`),
    which also skips the rounding of the product to half; elsewhere the product and a cast."""
    if p.dtype != dtype and dtype == torch.float32:
        out = mm_float32(p, q)
        if out is not None:
            return out
    out = torch.mm(p, q)
    return out if out.dtype == dtype else out.to(dtype)
