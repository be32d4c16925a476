"""The MAP reparametrisation of one weight: W* = α · W0/‖W0‖_F + β · ΔW/‖ΔW‖_F.

Shapes: W0 and ΔW are canonical [out, in] (:mod:`modapt.layers`; an embedding's is
[dim, num_embeddings]); α = ``map_alpha`` and β = ``map_beta`` are 0-dim parameters on the
host; ‖W0‖_F = ``map_w0_norm`` is a 0-dim float32 buffer computed once (non-persistent: it is
recomputed from the base weight, which the adapter file's fingerprint pins, so it never
reaches the adapter file). The Frobenius norm of a matrix is the 2-norm of the flattened
vector, so the formula is the same for every layer kind.

Training never builds an [out, in] matrix when the update has a closed-form norm::

    y = (α/‖W0‖) · (W0 x) + (β/‖ΔW‖) · ΔW x + b

with ``W0 x + b`` the base layer's own output (one matmul), ``ΔW x`` the update's thin path
and ‖ΔW‖² from ``update.frobenius_sq`` (r×r work for LoRA). Only when that returns ``None``
is ΔW materialised (``update.delta_weight``) to take its norm.
"""

from __future__ import annotations

import torch
from modapt import Reparam, Update, layers
from modapt.lora import Lora
from torch import nn

from .factored import MapFactored, compute_dtype
from .options import MapOptions
from .output import map_output


class Map(Reparam):
    """MAP around ``update`` on ``host``. Parameters ``map_alpha`` and ``map_beta`` (0-dim).

    ``update_parameter_names`` (the update's keys on the host, e.g. ``lora_A.weight``) and
    ``magnitude_parameter_names`` (``map_alpha``, ``map_beta``) are the two groups of the
    stepwise schedule.
    """

    magnitude_parameter_names = ("map_alpha", "map_beta")

    def __init__(self, host: nn.Module, options: MapOptions, update: Update):
        super().__init__(host, options, update)
        # built after the update: everything adapter-owned on the host so far is the update's
        self.update_parameter_names = tuple(
            n for n, _ in host.named_parameters() if not n.startswith("base_layer."))
        w0 = layers.weight_of(host.base_layer).detach()
        w0_norm = torch.linalg.vector_norm(w0.float())
        if not bool(torch.isfinite(w0_norm)) or float(w0_norm) == 0.0:
            raise ValueError(f"‖W0‖_F is {float(w0_norm)}: MAP's direction W0/‖W0‖_F is undefined for this weight")
        host.register_buffer("map_w0_norm", w0_norm, persistent=False)
        beta = 1.0
        if options.init == "identity":
            beta = 0.0
            self._nonzero_update(w0)
        host.register_parameter("map_alpha", nn.Parameter(w0_norm.detach().clone()))
        host.register_parameter("map_beta", nn.Parameter(torch.tensor(beta, dtype=torch.float32)))

    @torch.no_grad()
    def _nonzero_update(self, w0: torch.Tensor) -> None:
        """Give ΔW a direction: every all-zero update parameter gets N(0, identity_std²).

        An update that is zero at init without a zero parameter (IA3's ΔW = diag(l − 1)·W0
        with l = 1) gets N(0, identity_std²) added to every parameter instead. With β = 0 the
        output is W0 x whatever ΔW is, and the gradients are finite because ‖ΔW‖ > 0: β's is
        ⟨∂L/∂W*, ΔW/‖ΔW‖⟩, the update's is scaled by β/‖ΔW‖ (0 at the first step, finite after).
        """
        params = dict(self.host.named_parameters())
        floating = [params[n] for n in self.update_parameter_names if params[n].is_floating_point()]
        std = self.options.identity_std
        for p in floating:
            if not bool(p.any()):
                p.normal_(0.0, std)
        if float(self.update_norm(w0, floor=False)) == 0.0:
            for p in floating:
                p.add_(torch.randn_like(p) * std)
        if float(self.update_norm(w0, floor=False)) == 0.0:
            raise ValueError("init = \"identity\" needs a non-zero update, and this update's ΔW stays 0 when its "
                             "parameters are perturbed; use init = \"paper\"")

    def update_norm(self, w0: torch.Tensor, *, floor: bool = True) -> torch.Tensor:
        """max(‖ΔW‖_F, eps) as a 0-dim float32 tensor (differentiable; finite gradient at ΔW = 0).

        ``w0`` [out, in] is the base weight as stored (LoRMA-style updates need it). The closed
        form ``update.frobenius_sq`` is used when the update has one; otherwise ΔW is built.
        The floor is a clamp of ‖ΔW‖² at eps²: below it the gradient is 0, not the 1/0 of √.
        (The one-node path, :mod:`modapt_map.factored`, computes the same from the factors.)
        """
        sq = self.update.frobenius_sq(w0)
        if sq is None:
            sq = self.update.delta_weight(w0).float().square().sum()
        sq = sq.float()
        if floor:
            sq = sq.clamp_min(self.options.eps ** 2)
        return sq.sqrt()

    def scales(self, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α/‖W0‖_F, β/max(‖ΔW‖_F, eps)), the two 0-dim factors of W* = a·W0 + b·ΔW."""
        host = self.host
        return host.map_alpha / host.map_w0_norm, host.map_beta / self.update_norm(w0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """y [..., out] = a·(W0 x) + b·(ΔW x) + bias, from the base output and the update's thin path.

        Written as ``base_out + (a − 1)·(base_out − bias) + …`` so that a = 1, β = 0 gives
        the base output bit for bit (identity at init). Over a factored update (LoRA, AdaLoRA)
        on a plain linear layer, one autograd node computes it from the factors
        (:mod:`modapt_map.factored`: stores x and h = R x only); otherwise the base output and the
        update's forward are combined by :mod:`modapt_map.output` (stores x and ΔW x).
        """
        base = self.base_layer
        dtype = None if args or kwargs else compute_dtype(x, self.host, self.update)
        if dtype is not None:
            host = self.host
            update = self.update
            eps = self.options.eps
            if type(update) is Lora:
                # L = s·B passed as B with the floor eps/s: b·L = (s·b)·B, max(‖ΔW‖, eps) = s·max(‖B A‖, eps/s),
                # and the node's gradient for its L is then B's; one op and one autograd node fewer per layer
                left, right, eps = host.lora_B.weight, host.lora_A.weight, eps / update.scaling
            else:
                left, right = update.factors()
            return MapFactored.apply(x, layers.weight_of(base), base.bias, left, right, host.map_alpha,
                                     host.map_beta, host.map_w0_norm, eps, dtype)
        base_out = base(x, *args, **kwargs)
        # a quantized W0 is dequantized only for an update whose norm needs it (LoRMA)
        skip_w0 = (layers.is_quantized(base) and type(self.update).frobenius_sq is Update.frobenius_sq
                   and self.update.factors() is not None)
        a, b = self.scales(None if skip_w0 else layers.weight_of(base))
        delta_x = self.update.forward(x, base_out, base)
        return map_output(x, delta_x, a, b, base_out, base)

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W* [out, in] = a·W0 + b·ΔW in ``w0``'s dtype (the core passes float32)."""
        a, b = self.scales(w0)
        delta = self.update.delta_weight(w0).to(w0.dtype)
        return a.to(w0.dtype) * w0 + b.to(w0.dtype) * delta
