"""The bottleneck module itself: ``up(dropout(act(down(h))))``, zero at init."""

from __future__ import annotations

import math

import torch
from torch import nn

from .options import ACTIVATION_NAMES

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # AdapterHub's name for SiLU (Houlsby's default there)
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "options.ACTIVATION_NAMES lists these keys, for the option's schema"


class BottleneckAdapter(nn.Module):
    """h [..., d] -> up(dropout(act(down(h)))) [..., d]: the adapter branch, without scale or skip.

    down: ``nn.Linear(d, r)`` (PyTorch's default init: Kaiming-uniform, a = √5);
    up: ``nn.Linear(r, d)`` with weight and bias zero, so the branch is 0 at init and the
    adapted block equals the base block.
    """

    def __init__(self, d: int, r: int, activation: str, dropout: float):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(r, d)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # the adapter keeps float32 parameters over a bf16 base (the core's autocast_adapter_dtype):
        # compute in its dtype, return in the stream's
        dtype = self.down.weight.dtype
        x = h if h.dtype == dtype or torch.is_autocast_enabled(h.device.type) else h.to(dtype)
        return self.up(self.dropout(self.act(self.down(x)))).to(h.dtype)
