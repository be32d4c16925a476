"""FLoRA: ``ΔW = s · B G A`` with a trainable r×r core ``G`` (Si et al., ICLR 2025).

The Tucker form of a matrix: two factor matrices and a small core between them.

Shapes (canonical weight [out, in], see :mod:`modapt.layers`):
    A ``flora_A`` [r, in]   Kaiming-uniform (a = √5, bound 1/√in), as LoRA's A
    G ``flora_G`` [r, r]    zeros, so ΔW = 0 at init
    B ``flora_B`` [out, r]  Kaiming-uniform (a = √5, bound 1/√r)
    s = lora_alpha / r

All three are trainable. With LoRA's ``B = 0`` *and* ``G = 0`` every gradient would vanish
forever (∂L/∂G ∝ Bᵀ(·)Aᵀ, ∂L/∂B ∝ (·)(G A)ᵀ, ∂L/∂A ∝ (B G)ᵀ(·)), so only the core starts at
zero: with A and B random, G gets gradient at the first step, and A and B from the step after.
"""

from __future__ import annotations

import math

import modapt
import torch
from modapt import layers
from torch import nn

from .options import FloraOptions


class Flora(modapt.Update):
    """ΔW = s · B G A. ``forward`` costs three thin matmuls; ΔW is never built in training."""

    def __init__(self, host: nn.Module, options: FloraOptions):
        super().__init__(host, options)
        out_f, in_f = layers.dims_of(host.base_layer)
        r = options.r
        if r > min(out_f, in_f):
            raise ValueError(f"r = {r} exceeds the layer's smaller dimension ({min(out_f, in_f)})")
        self.scaling = options.lora_alpha / r
        a = torch.empty(r, in_f)
        b = torch.empty(out_f, r)
        # Kaiming-uniform with a = √5 (bound 1/√fan_in), LoRA's init of A, for both factors: B's
        # entries are then O(1/√r) and one optimizer step on G moves ΔW about as far as a
        # step on LoRA's B does.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        host.register_parameter("flora_A", nn.Parameter(a))
        host.register_parameter("flora_G", nn.Parameter(torch.zeros(r, r)))
        host.register_parameter("flora_B", nn.Parameter(b))
        host.flora_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()

    fused_low_rank = True  # forward = dropout(x) Aᵀ (s·B G)ᵀ with (L, R) = factors()

    @property
    def input_dropout(self):
        return self.host.flora_dropout

    def forward(self, x, base_out, base_layer):
        """x [..., in] -> s · B G A x [..., out]."""
        h = self.host
        if x.dtype != h.flora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(h.flora_A.dtype)
        z = nn.functional.linear(h.flora_dropout(x), h.flora_A)     # [..., r]
        z = nn.functional.linear(z, h.flora_G)                      # [..., r]
        return nn.functional.linear(z, h.flora_B) * self.scaling    # [..., out]

    def factors(self):
        """(s · B G [out, r], A [r, in]): ‖ΔW‖_F² and DoRA's row norms cost r×r and out×r work."""
        h = self.host
        return (h.flora_B @ h.flora_G) * self.scaling, h.flora_A

    def delta_weight(self, w0):
        left, right = self.factors()
        return left.to(w0.dtype) @ right.to(w0.dtype)
