"""LoRA's update, the torch side of :mod:`modapt.lora` (imported when a model is built).

``ΔW = s · B A``: A [r, in], B [out, r], s = lora_alpha / r (or / √r with rsLoRA).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import fast_path_switches, layers
from .lora import LoraOptions, scaling
from .lora_linear import LoraLinear
from .tracing import exporting
from .update import Update


class Lora(Update):
    """ΔW = s · B A. ``forward`` costs two thin matmuls; ΔW is never built in training."""

    fused_low_rank = True  # forward = dropout(x) Aᵀ (s·B)ᵀ with factors() = (s·B, A)

    def __init__(self, host: nn.Module, options: LoraOptions):
        super().__init__(host, options)
        out_f, in_f = layers.dims_of(host.base_layer)
        r = options.r
        if r > min(out_f, in_f):
            raise ValueError(f"r = {r} exceeds the layer's smaller dimension ({min(out_f, in_f)})")
        self.scaling = scaling(options)
        self.is_embedding = layers.layer_kind(host.base_layer) == "embedding"
        host.lora_A = nn.Linear(in_f, r, bias=False)
        host.lora_B = nn.Linear(r, out_f, bias=False)
        with torch.no_grad():
            if self.is_embedding:
                nn.init.zeros_(host.lora_A.weight)
                nn.init.normal_(host.lora_B.weight)
            else:
                nn.init.kaiming_uniform_(host.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(host.lora_B.weight)
        dropout = options.dropout if not self.is_embedding else 0.0
        host.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def input_dropout(self):
        return self.host.lora_dropout

    def forward(self, x, base_out, base_layer):
        a, b = self.host.lora_A, self.host.lora_B
        if self.is_embedding:
            return (layers.embed(base_layer, x, a.weight.t()) @ b.weight.t()) * self.scaling
        if x.dtype != a.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.weight.dtype)
        return b(a(self.host.lora_dropout(x))) * self.scaling

    def layer_output(self, x, base_layer, *args, **kwargs):
        """W0 x + b + s·B A x as one autograd node (:mod:`modapt.lora_linear`), or ``None``.

        Taken for a plain ``nn.Linear`` / ``Conv1D`` base without hooks, a frozen base, no
        active dropout, under autocast or with one dtype throughout, eagerly or under
        torch.compile (dynamo traces the node's forward and backward; inductor then emits fewer
        kernels than from the module path, about one per layer under autocast: the scale and
        the sum ride on an addmm); export and jit tracing keep the module path. Anything else
        (a float32 adapter on a bf16 base without autocast, accelerate's offload hooks on the
        base, ...) returns ``None``: the module path.
        """
        if not fast_path_switches.current.one_node or args or kwargs or self.is_embedding or not layers.called_plainly(base_layer):
            return None
        if base_layer.weight.requires_grad or exporting():
            return None
        host = self.host
        if host.training and not isinstance(host.lora_dropout, nn.Identity):
            return None
        a, b = host.lora_A.weight, host.lora_B.weight
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            if not x.is_floating_point():
                return None
        elif x.dtype == base_layer.weight.dtype == a.dtype == b.dtype:
            dtype = x.dtype
        else:
            return None
        bias = base_layer.bias
        if bias is not None and bias.requires_grad:
            return None
        return LoraLinear.apply(x, layers.weight_of(base_layer), bias, a, b, self.scaling, dtype)

    def factors(self):
        return self.host.lora_B.weight * self.scaling, self.host.lora_A.weight

    def delta_weight(self, w0):
        left, right = self.factors()
        return (left.to(w0.dtype) @ right.to(w0.dtype))
