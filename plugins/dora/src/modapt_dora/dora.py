"""DoRA (Liu et al., ICML 2024): ``W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row`` over any update.

Shapes (canonical, :mod:`modapt.layers`): W0, ΔW [out, in]; the magnitude m [out]
(parameter ``lora_magnitude_vector``), initialised to ‖W0 + ΔW‖_row at build (= ‖W0‖_row for
LoRA, whose ΔW is zero at init). The row norm is a constant of each step: computed without
gradient, as PEFT does after DoRA §4.3.

Forward, with ``s = m / ‖W0 + ΔW‖_row`` [out] and b the bias (none for embeddings)::

    y = s ⊙ (W0 x + ΔW x) + b                         (eval, or no active dropout)
    y = W0 x + b + (s − 1) ⊙ W0 x̃ + s ⊙ ΔW x̃          (training with dropout, x̃ = dropout(x))

The second line is PEFT 0.21's: with dropout the base term is recomputed on the dropped
input (one more full matmul of W0, only then). Without dropout ``W0 x + b`` is the base layer's
own output; nothing multiplies W0 a second time, and the norm comes from the update's
``factors()`` (:mod:`modapt_dora.norm`: W0 + L R built in one ``addmm`` where that is cheaper
than many small kernels, expanded in out×k work on large CUDA layers). LoRA on a linear layer
without active dropout runs as one autograd node (:mod:`modapt_dora.fused`).
"""

from __future__ import annotations

import torch
from modapt import Reparam, layers
from modapt.lora import Lora
from torch import nn

from .fused import DoraLora
from .norm import BaseRowNormCache, direct_factor_norm, direct_is_cheaper, direct_row_norm, factored_row_norm
from .options import MAGNITUDE, DoraOptions
from .rescale import rescale

class Dora(Reparam):
    """The DoRA reparam on one host (an :class:`modapt.AdaptedLayer`)."""

    def __init__(self, host: nn.Module, options: DoraOptions, update):
        super().__init__(host, options, update)
        base = host.base_layer
        self.has_bias = getattr(base, "bias", None) is not None and layers.layer_kind(base) != "embedding"
        self._w0_sq = BaseRowNormCache()
        # an update declaring fused_low_rank (LoRA, AdaLoRA, FLoRA, VeRA...) on a linear (or Conv1D)
        # layer takes the fused path (modapt_dora.fused) when no dropout acts; anything else
        # (embeddings, other updates, dropout) the general one
        self._fusable = update.fused_low_rank and layers.layer_kind(base) != "embedding"
        with torch.no_grad():
            w0 = layers.weight_of(base).float()
            magnitude = direct_row_norm(w0, update.delta_weight(w0))
        host.register_parameter(MAGNITUDE, nn.Parameter(magnitude))

    # ------------------------------------------------------------------ the norm
    def row_norm(self) -> torch.Tensor:
        """‖W0 + ΔW‖_row [out] float32, detached: factored when the update offers ``factors()``."""
        base = self.base_layer
        w0 = layers.weight_of(base)
        with torch.no_grad(), torch.autocast(w0.device.type, enabled=False):
            fac = self.update.factors()
            if fac is None:
                return direct_row_norm(w0, self.update.delta_weight(w0.float()))
            return self._factor_norm(w0, *fac)

    def _factor_norm(self, w0, left, right):
        """‖W0 + L R‖_row [out] float32 (no grad, autocast off): direct or expanded, by size."""
        if direct_is_cheaper(w0) or layers.is_quantized(self.base_layer):  # a dequantized W0 is a copy already
            return direct_factor_norm(w0, left, right)
        return factored_row_norm(w0, self._w0_sq.get(self.base_layer.weight, w0), left, right)

    def scale(self) -> torch.Tensor:
        """s = m / ‖W0 + ΔW‖_row [out] float32; differentiable in m only."""
        magnitude = getattr(self.host, MAGNITUDE)
        return magnitude.float() / self.row_norm()

    # ------------------------------------------------------------------ forward
    def forward(self, x, *args, **kwargs):
        if self._fusable and not args and not kwargs:
            fused = self._fused_forward(x)
            if fused is not None:
                return fused
        base = self.base_layer
        base_out = base(x, *args, **kwargs)
        scale = self.scale()
        dropout = self._active_dropout()
        if dropout is None:
            delta = self.update.forward(x, base_out, base)
            # y = s ⊙ (base_out − b + Δ) + b = (1 − s) ⊙ b + s ⊙ (base_out + Δ)
            shift = (1.0 - scale) * self.host.base_layer.bias if self.has_bias else None
            return rescale(base_out, delta, scale, shift)
        dropped = dropout(x)
        w0_dropped = layers.linear_apply(base, dropped, layers.weight_of(base))  # W0 x̃, no bias
        dropped_out = w0_dropped + base.bias if self.has_bias else w0_dropped
        delta = self._update_without_dropout(dropped, dropped_out)
        # y = base_out + (s − 1) ⊙ W0 x̃ + s ⊙ ΔW x̃ = (base_out − W0 x̃) + s ⊙ (W0 x̃ + ΔW x̃)
        return rescale(w0_dropped, delta, scale, base_out - w0_dropped)

    def _fused_forward(self, x):
        """The whole layer as one :class:`~modapt_dora.fused.DoraLora` node, or ``None`` when
        the general path must run (dropout active, a base layer not called plainly (hooks, a
        subclass), mixed dtypes)."""
        base = self.base_layer
        if not layers.called_plainly(base) or self._active_dropout() is not None:
            return None
        w0 = layers.weight_of(base)
        device = w0.device.type
        autocast = torch.is_autocast_enabled(device)
        if not autocast and x.dtype != w0.dtype:
            return None
        host = self.host
        if isinstance(self.update, Lora):  # B and A as leaves, s inside the node: one op fewer
            lora_a, lora_b, scaling = host.lora_A.weight, host.lora_B.weight, self.update.scaling
        else:  # (L, R) = factors(): autograd carries the node's gradients back to the parameters
            (lora_b, lora_a), scaling = self.update.factors(), 1.0
        with torch.no_grad():
            if autocast:
                with torch.autocast(device, enabled=False):
                    norm = self._lora_norm(w0, lora_a, lora_b, scaling)
            else:
                norm = self._lora_norm(w0, lora_a, lora_b, scaling)
        compute_dtype = torch.get_autocast_dtype(device) if autocast else None
        return DoraLora.apply(x, lora_a, lora_b, getattr(host, MAGNITUDE), w0, base.bias, norm, scaling, compute_dtype)

    def _lora_norm(self, w0, lora_a, lora_b, scaling):
        """‖W0 + c·B A‖_row [out] float32 for LoRA's A [r, in], B [out, r] (no grad, autocast off)."""
        if direct_is_cheaper(w0) and lora_a.dtype == lora_b.dtype == torch.float32:
            # W0 + c·B A in one addmm (c as its alpha), in place on a half W0's float32 copy
            if w0.dtype == torch.float32:
                weight = torch.addmm(w0, lora_b, lora_a, alpha=scaling)
            else:
                weight = w0.float().addmm_(lora_b, lora_a, alpha=scaling)
            return torch.linalg.vector_norm(weight, dim=1)
        return self._factor_norm(w0, lora_b * scaling, lora_a)

    def _active_dropout(self) -> nn.Module | None:
        """The update's input dropout (``Update.input_dropout``) when it acts this call."""
        dropout = self.update.input_dropout
        if not self.host.training or dropout is None or isinstance(dropout, nn.Identity):
            return None
        if isinstance(dropout, nn.Dropout) and dropout.p == 0:
            return None
        return dropout

    def _update_without_dropout(self, dropped, dropped_out):
        """ΔW x̃ for an already dropped x̃: the update's own dropout is off for this call, so the
        base term and the update see the same mask (PEFT's semantics)."""
        modules = self.host._modules
        name = next(k for k, m in modules.items() if m is self.update.input_dropout)
        saved = modules[name]
        modules[name] = _IDENTITY
        try:
            return self.update.forward(dropped, dropped_out, self.base_layer)
        finally:
            modules[name] = saved

    # ------------------------------------------------------------------ merge
    def merged_weight(self, w0):
        """W* = m / ‖W0 + ΔW‖_row ⊙ (W0 + ΔW), [out, in] in ``w0``'s dtype; the norm direct."""
        weight = w0 + self.update.delta_weight(w0).to(w0.dtype)
        norm = torch.linalg.vector_norm(weight, dim=1)
        magnitude = getattr(self.host, MAGNITUDE).to(w0.dtype)
        return (magnitude / norm).unsqueeze(1) * weight


_IDENTITY = nn.Identity()
