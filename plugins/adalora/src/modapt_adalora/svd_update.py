"""AdaLoRA's update in SVD form: ΔW = P Λ Q · c with c = lora_alpha / (init_r + 1e-5).

Shapes (canonical [out, in] weights, see :mod:`modapt.layers`)::

    P  = lora_B  [out, r]   left singular vectors
    Λ  = lora_E  [r, 1]     singular values (diag(Λ) as a column, masked by zeroing)
    Q  = lora_A  [r, in]    right singular vectors
    ΔW = lora_B @ (lora_A * lora_E) * c                      [out, in]

with r = ``init_r`` for the whole run: pruning a triplet (P[:, i], Λ[i], Q[i]) zeroes Λ[i]
in place, as PEFT does, so no tensor changes shape and the divisor stays ``init_r`` (PEFT's
``ranknum``, which it never updates during training). ``rank_pattern`` [r] (bool buffer) records
which triplets the last allocation kept; it is saved with the adapter.
"""

from __future__ import annotations

import torch
from modapt import Update, layers
from torch import nn

from .budget_state import budget_state_for
from .options import AdaLoraOptions

#: PEFT adds this to ``ranknum`` before dividing (its guard against a zero rank).
RANKNUM_EPS = 1e-5


def scale_of(options: AdaLoraOptions) -> float:
    """c = lora_alpha / (init_r + 1e-5), the divisor rounded to float32 as PEFT's ``ranknum`` is."""
    ranknum = float(torch.tensor(float(options.init_r), dtype=torch.float32) + RANKNUM_EPS)
    return options.lora_alpha / ranknum


class AdaLora(Update):
    """The SVD-form update of one layer; parameters ``lora_A``, ``lora_E``, ``lora_B`` on the host.

    Init as PEFT: Λ = 0 (so ΔW = 0: the adapted model starts as the base), P and Q ~ N(0, 0.02²).
    """

    def __init__(self, host: nn.Module, options: AdaLoraOptions):
        super().__init__(host, options)
        out_f, in_f = layers.dims_of(host.base_layer)
        r = options.init_r
        if r > min(out_f, in_f):
            raise ValueError(f"init_r = {r} exceeds the layer's smaller dimension ({min(out_f, in_f)})")
        self.init_r = r
        self.scale = scale_of(options)
        self._scale_tensors: dict[tuple, torch.Tensor] = {}
        host.register_parameter("lora_A", nn.Parameter(torch.empty(r, in_f)))
        host.register_parameter("lora_E", nn.Parameter(torch.zeros(r, 1)))
        host.register_parameter("lora_B", nn.Parameter(torch.empty(out_f, r)))
        with torch.no_grad():
            nn.init.normal_(host.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(host.lora_B, mean=0.0, std=0.02)
        # which triplets the last allocation kept (all of them until the first one)
        host.register_buffer("rank_pattern", torch.ones(r, dtype=torch.bool))
        host.lora_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
        # the allocator's state across layers and steps, on the model (modapt.shared); a plain
        # attribute, so that it is not a submodule of each host
        self.budget_state = budget_state_for(options.schedule_key())

    fused_low_rank = True  # forward = dropout(x) Rᵀ Lᵀ with (L, R) = factors()

    @property
    def input_dropout(self):
        return self.host.lora_dropout

    def forward(self, x, base_out, base_layer):
        """ΔW x for x [..., in] -> [..., out]: two thin matmuls, c folded into the r values of Λ."""
        a, e, b = self.host.lora_A, self.host.lora_E, self.host.lora_B
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        x = self.host.lora_dropout(x)
        return nn.functional.linear(nn.functional.linear(x, a * (e * self._scale_like(e))), b)

    def _scale_like(self, e: torch.Tensor) -> torch.Tensor:
        """c as a 0-dim tensor of Λ's dtype and device, made once: multiplying by a Python float
        wraps and casts it on every call (three more dispatches, forward and backward, per layer);
        the product is the same, c being rounded to Λ's dtype either way."""
        key = (e.device, e.dtype)
        scale = self._scale_tensors.get(key)
        if scale is None:
            with torch.inference_mode(False):  # made in an inference-mode forward, it must still serve training
                scale = self._scale_tensors[key] = torch.tensor(self.scale, dtype=e.dtype, device=e.device)
        return scale

    def factors(self):
        """(L [out, r], R [r, in]) = (P diag(Λ) c, Q); masked triplets have Λ = 0, so zero columns of L."""
        host = self.host
        return host.lora_B * (host.lora_E.t() * self.scale), host.lora_A

    def delta_weight(self, w0):
        left, right = self.factors()
        return left.to(w0.dtype) @ right.to(w0.dtype)

    def extra_state(self):
        # the live buffer: modapt.load copies the saved pattern into it
        return {"rank_pattern": self.host.rank_pattern}

    def current_rank(self) -> int:
        """The number of triplets the last allocation kept (``init_r`` before the first one)."""
        return int(self.host.rank_pattern.sum())
