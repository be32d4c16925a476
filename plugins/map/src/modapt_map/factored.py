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
from modapt import Update, layers
from modapt.tracing import exporting
from torch import nn

from .output import inner

#: Updates whose ``forward(x)`` is exactly ``dropout(x) Rᵀ Lᵀ`` with ``(L, R) = factors()``, whose
#: factors are cheap (k×in and out×k work) and whose input dropout, if any, is ``host.lora_dropout``.
#: Named by module and qualified name (no import of the other distributions); a subclass is not
#: in the set, as it may change the forward.
FACTORED_UPDATES = frozenset({"modapt.lora.Lora", "modapt_adalora.svd_update.AdaLora"})

#: Switch for measurements (``benchmarks/step_time.py`` runs each method both ways): ``False``
#: sends every layer through the general path.
ENABLED = True


def compute_dtype(x: torch.Tensor, host: nn.Module, update: Update) -> torch.dtype | None:
    """The dtype the fused node would compute in for input ``x``, or ``None``: the general path.

    Fused when: the graph is not being exported (torch.export, ONNX and jit tracing keep the
    general path's plain ops; torch.compile traces the node's forward and backward), the base is a plain
    ``nn.Linear``/``Conv1D`` called as such (:func:`modapt.layers.called_plainly`) with a frozen weight
    (the bias may train: its gradient is the sum of g over tokens), the
    update is one of :data:`FACTORED_UPDATES`, and its input dropout is inactive (p = 0 or eval
    mode: with dropout, R's gradient needs the dropped x and the base path the plain one, and
    storing both would cost more than the general path saves; dropout > 0 in training keeps it).
    """
    if not ENABLED or not x.is_floating_point() or exporting():
        return None
    base = host.base_layer
    if not layers.called_plainly(base):
        return None
    cls = type(update)
    if f"{cls.__module__}.{cls.__qualname__}" not in FACTORED_UPDATES:
        return None
    if base.weight.requires_grad:
        return None
    dropout = getattr(host, "lora_dropout", None)
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
    ‖ΔW‖² = sum((LᵀL) ⊙ (R Rᵀ)), the contract's closed form (k×k work, in the factors' dtype),
    and their backward is written out: as autograd nodes, these few scalar and k×k ops cost
    more dispatches per layer than the rest of the layer (the launch-bound 135M regime).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, left, right, alpha, beta, w0_norm, eps, dtype):
        with torch.autocast(x.device.type, enabled=False):  # k×k work in the factors' own dtype
            gram_left = left.t() @ left  # LᵀL [k, k]
            gram_right = right @ right.t()  # R Rᵀ [k, k]
        sq = (gram_left * gram_right).sum(dtype=torch.promote_types(left.dtype, torch.float32))  # ‖L R‖_F²
        norm = sq.clamp_min(eps * eps).sqrt()
        a = alpha / w0_norm
        b = beta / norm
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)  # cast once, for the base and the update alike; stored cast
        w0c = w0 if w0.dtype == dtype else w0.to(dtype)
        bias_c = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
        left_c = left if left.dtype == dtype else left.to(dtype)
        right_c = right if right.dtype == dtype else right.to(dtype)
        y = F.linear(x2, w0c, bias_c)  # W0 x + bias: the base layer's output [N, out]
        # (a − 1) is rounded to the compute dtype, not a: its rounding error then scales the
        # correction only, and a = 1 adds exactly 0
        am1 = (a - 1).to(dtype)
        if bias is None:
            y.addcmul_(y, am1)
        else:
            y = torch.addcmul(y, y - bias_c, am1)
        h = torch.mm(x2, right_c.t())  # [N, k]
        scaled_left = left * b
        y.addmm_(h, (scaled_left if scaled_left.dtype == dtype else scaled_left.to(dtype)).t())
        ctx.save_for_backward(x2, h, w0c, left_c, left, right, gram_left, gram_right, sq, norm, a, b, w0_norm)
        ctx.meta = (shape, x.dtype, None if bias is None else bias.dtype, alpha.dtype, beta.dtype, eps * eps)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, w0c, left_c, left, right, gram_left, gram_right, sq, norm, a, b, w0_norm = ctx.saved_tensors
        shape, x_dtype, bias_dtype, alpha_dtype, beta_dtype, eps_sq = ctx.meta
        need_x, _, need_bias, need_left, need_right, need_alpha, need_beta = ctx.needs_input_grad[:7]
        dtype = x2.dtype
        g = grad.reshape(-1, grad.shape[-1])
        if g.dtype != dtype:
            g = g.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # sums of half products accumulate in fp32
        grad_x = grad_bias = grad_left = grad_right = grad_alpha = grad_beta = None
        if need_bias:
            grad_bias = g.sum(dim=0, dtype=acc).to(bias_dtype)
        # ∂L/∂b = ⟨g, h Lᵀ⟩ = ⟨g L, h⟩; b = β/‖ΔW‖ passes it to β and, through ‖ΔW‖, to L and R
        g_left = torch.mm(g, left_c) if (need_x or need_right or need_left or need_beta) else None  # g L [N, k]
        if need_left or need_right or need_beta:
            grad_b = inner(g_left, h, acc).float()
            if need_beta:
                grad_beta = (grad_b / norm).to(beta_dtype)
            # ∂L/∂(‖ΔW‖²) · 2 = −∂L/∂b · b/‖ΔW‖² (0 below the floor): the k×k terms of the factors' gradients
            coef = torch.where(sq >= eps_sq, -grad_b * b / (norm * norm), 0.0)
            with torch.autocast(g.device.type, enabled=False):
                if need_left:  # b · gᵀ h + coef · L (R Rᵀ)   [out, k]
                    grad_left = torch.addcmul(left @ (gram_right * coef).to(left.dtype),
                                              torch.mm(g.t(), h).to(left.dtype), b.to(left.dtype))
                if need_right:  # b · (g L)ᵀ x + coef · (LᵀL) R   [k, in]
                    grad_right = torch.addcmul((gram_left * coef).to(right.dtype) @ right,
                                               torch.mm(g_left.t(), x2).to(right.dtype), b.to(right.dtype))
        if need_x or need_alpha:
            g_w0 = torch.mm(g, w0c)  # [N, in]: the base path's input gradient before the factor a
            if need_alpha:
                grad_alpha = (inner(g_w0, x2, acc) / w0_norm).to(alpha_dtype)  # ⟨g, W0 x⟩/‖W0‖ = ⟨g W0, x⟩/‖W0‖
            if need_x:
                scaled_right = right * b
                if scaled_right.dtype != dtype:
                    scaled_right = scaled_right.to(dtype)
                # a·g W0 + b·(g L) R, a as 1 + (a − 1) for the forward's reason: a rounded to bf16
                # would scale the whole input gradient by up to 1 ± 2⁻⁹, (a − 1) rounded only its correction
                grad_x = g_w0.addcmul_(g_w0, (a - 1).to(dtype)).addmm_(g_left, scaled_right)
                grad_x = grad_x.view(shape)
                if grad_x.dtype != x_dtype:
                    grad_x = grad_x.to(x_dtype)
        return grad_x, None, grad_bias, grad_left, grad_right, grad_alpha, grad_beta, None, None, None
