"""VeRA: ``ΔW = Λ_b B Λ_d A`` with A, B frozen, random and shared by every adapted layer.

Shapes: one A [r, in_max] and one B [out_max, r] per model (in_max, out_max: the largest input
and output sizes over the adapted layers); a layer [out, in] uses A[:, :in] and B[:out, :].
Trainable per layer: ``vera_lambda_d`` [r] (Λ_d = diag) and ``vera_lambda_b`` [out] (Λ_b).
Forward: ``ΔW x = λ_b ⊙ (B_s (λ_d ⊙ (A_s dropout(x))))``, two thin matmuls; ΔW is never built
in training.

Why shared state: the method's point is that A and B cost nothing per layer, so they live
once on the model (:mod:`modapt.shared`, ``model.modapt_shared["vera_<key>_<r>"]``) as
non-persistent float32 buffers, and each layer keeps a reference to that module. They are
*regenerated* from ``projection_prng_key``, never stored in modapt's files: A then B are drawn
from one CPU ``torch.Generator`` seeded with the key, each uniform in ±gain·√(3/fan_in) with
gain √2 (Kaiming-uniform, fan_in = in_max for A and r for B), which is the draw PEFT 0.21
makes, so the same key gives PEFT's matrices bit for bit on any device.
Init as PEFT: λ_b = 0 (ΔW = 0 at init), λ_d = ``d_initial``.

``save_projection`` is PEFT's field and only concerns PEFT folders: True (PEFT's default) makes
the PEFT folder written for this adapter store A and B once (``base_model.vera_A``/``vera_B``),
and a PEFT folder that stores them is read by checking that they equal the regenerated ones bit
for bit (a mismatch is refused, never silently replaced: modapt's state is defined by the key).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import modapt
from modapt import layers
from modapt.shared import shared_module

from .options import VeraOptions


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] float32 on the CPU, uniform in ±√2·√(3/cols) (fan_in = cols), drawn from ``generator``."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The shared A [r, in_max] and B [out_max, r] (non-persistent buffers ``vera_A``, ``vera_B``).

    ``cover(out, in)`` grows (out_max, in_max) and redraws both from the key: the draw depends on
    the shapes, so the final matrices are those of the largest sizes over all adapted layers,
    as PEFT's. Layers built earlier read the buffers at call time and see the final ones.
    """

    def __init__(self, key: int, r: int):
        super().__init__()
        self.key, self.r = key, r
        self.out_max = self.in_max = 0
        self.register_buffer("vera_A", torch.empty(r, 0), persistent=False)
        self.register_buffer("vera_B", torch.empty(0, r), persistent=False)

    def cover(self, out_f: int, in_f: int) -> None:
        if out_f <= self.out_max and in_f <= self.in_max:
            return
        self.out_max, self.in_max = max(self.out_max, out_f), max(self.in_max, in_f)
        generator = torch.Generator(device="cpu").manual_seed(self.key)
        device = self.vera_A.device
        self.vera_A = _kaiming_uniform((self.r, self.in_max), generator).to(device)   # A first, then B
        self.vera_B = _kaiming_uniform((self.out_max, self.r), generator).to(device)

    def extra_repr(self) -> str:
        return f"key={self.key}, r={self.r}, A=[{self.r}, {self.in_max}], B=[{self.out_max}, {self.r}]"


class Vera(modapt.Update):
    """ΔW = Λ_b B_s Λ_d A_s on one layer; parameters ``vera_lambda_d`` [r], ``vera_lambda_b`` [out]."""

    fused_low_rank = True  # forward = dropout(x) Rᵀ Lᵀ with (L, R) = factors() = (Λ_b B_s, Λ_d A_s)

    def __init__(self, host: nn.Module, options: VeraOptions):
        super().__init__(host, options)
        out_f, in_f = layers.dims_of(host.base_layer)
        self.out_features, self.in_features = out_f, in_f
        key, r = options.projection_prng_key, options.r
        self.projection = shared_module(f"vera_{key}_{r}", lambda: VeraProjection(key, r))
        self.projection.cover(out_f, in_f)
        host.register_parameter("vera_lambda_b", nn.Parameter(torch.zeros(out_f)))
        host.register_parameter("vera_lambda_d", nn.Parameter(torch.full((r,), options.d_initial)))
        host.vera_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()

    @property
    def input_dropout(self):
        return self.host.vera_dropout

    def _sliced(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_s [r, in], B_s [out, r]) in ``dtype``, on the lambdas' device."""
        p, device = self.projection, self.host.vera_lambda_d.device
        return (p.vera_A[:, : self.in_features].to(device, dtype),
                p.vera_B[: self.out_features, :].to(device, dtype))

    def forward(self, x, base_out, base_layer):
        """x [..., in] -> λ_b ⊙ B_s (λ_d ⊙ A_s x) [..., out]."""
        h = self.host
        lam_d, lam_b = h.vera_lambda_d, h.vera_lambda_b
        if x.dtype != lam_d.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(lam_d.dtype)
        a, b = self._sliced(lam_d.dtype)
        z = nn.functional.linear(h.vera_dropout(x), a) * lam_d       # [..., r]
        return nn.functional.linear(z, b) * lam_b                    # [..., out]

    def factors(self):
        """(Λ_b B_s [out, r], Λ_d A_s [r, in])."""
        h = self.host
        a, b = self._sliced(h.vera_lambda_d.dtype)
        return h.vera_lambda_b[:, None] * b, h.vera_lambda_d[:, None] * a

    def delta_weight(self, w0):
        left, right = self.factors()
        return left.to(w0.dtype) @ right.to(w0.dtype)
