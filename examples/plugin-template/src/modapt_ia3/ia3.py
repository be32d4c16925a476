"""IA3: rescale a layer's output channels (``side="output"``) or input features (``side="input"``)
by a learned vector ``l``, initialised to ones so the layer starts as the base.

As a modapt *update* (canonical weight W0 [out, in]):

- output side: W = diag(l) · W0, so ΔW = diag(l − 1) · W0 and ΔW x = (l − 1) ⊙ (W0 x)
  — it reuses the base output, no extra matmul;
- input side (IA3's feed-forward form): W = W0 · diag(l), ΔW x = W0 ((l − 1) ⊙ x).

Parameter ``ia3_l``: [out] on the output side, [in] on the input side.
"""

from __future__ import annotations

import torch
from torch import nn

import modapt
from modapt import layers

from .options import Ia3Options


class Ia3(modapt.Update):
    """ΔW = diag(l − 1) W0 (output side) or W0 diag(l − 1) (input side)."""

    def __init__(self, host: nn.Module, options: Ia3Options):
        super().__init__(host, options)
        out_f, in_f = layers.dims_of(host.base_layer)
        size = out_f if options.side == "output" else in_f
        # registered on the host, so its name is "<layer path>.ia3_l" everywhere
        host.register_parameter("ia3_l", nn.Parameter(torch.ones(size)))

    def forward(self, x, base_out, base_layer):
        scale = self.host.ia3_l - 1  # [out] or [in]
        if self.options.side == "output":
            bias = getattr(base_layer, "bias", None)
            pure = base_out if bias is None else base_out - bias  # ΔW acts on W0 x, not on the bias
            return pure * scale.to(pure.dtype)
        return layers.linear_apply(base_layer, x * scale.to(x.dtype), layers.weight_of(base_layer))

    def delta_weight(self, w0):
        scale = (self.host.ia3_l - 1).to(w0.dtype)
        return scale[:, None] * w0 if self.options.side == "output" else w0 * scale[None, :]
