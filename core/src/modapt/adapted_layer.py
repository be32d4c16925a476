"""The wrapper that replaces an adapted layer at its attribute path."""

from __future__ import annotations

import torch
from torch import nn

from . import layers
from .errors import StateError


class AdaptedLayer(nn.Module):
    """A layer with a weight adapter: ``reparam(W0, update)`` around ``base_layer``.

    Called exactly like the layer it replaces (any leading shape). ``weight`` and ``bias``
    (and any other attribute, via ``__getattr__``) are the base layer's. The update's and the
    reparam's parameters are registered here, flat: ``lora_A.weight``, ``map_alpha``.

    States: *active* (adapter applied on the fly), *merged* (``merge(unload=False)``: the
    base weight holds W*, the original W0 is kept in ``_w0_backup`` for a bit-exact unmerge).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.update = None  # set by modapt.apply; plain objects, their tensors live on self
        self.reparam = None
        self.merged = False
        # the original weight while merged, for a bit-exact unmerge; a buffer so that .to()
        # moves it, non-persistent so that it never reaches a state dict or an adapter file
        self.register_buffer("_w0_backup", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def kind(self) -> str:
        return layers.layer_kind(self.base_layer)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    def forward(self, x, *args, **kwargs):
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.reparam.forward(x, *args, **kwargs)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W* [out, in] computed in float32 from the unmerged base weight, in the weight's dtype."""
        w0 = layers.weight_of(self.base_layer) if not self.merged else self._canonical_backup()
        return self.reparam.merged_weight(w0.float()).to(w0.dtype)

    def _canonical_backup(self) -> torch.Tensor:
        return self._w0_backup if self.kind == "linear" else self._w0_backup.t()

    @torch.no_grad()
    def merge(self, w_star: torch.Tensor | None = None) -> None:
        """Write W* into the base weight, keeping W0 for :meth:`unmerge`.

        ``w_star`` [out, in] is :meth:`merged_weight` when the caller already computed it
        (``modapt.merge`` checks every layer's W* before changing any).
        """
        if self.merged:
            raise StateError("layer is already merged")
        if w_star is None:
            w_star = self.merged_weight()
        self._check_finite(w_star)
        self._w0_backup = self.base_layer.weight.detach().clone()
        self.base_layer.weight.copy_(layers.to_storage(self.base_layer, w_star))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight bit-exactly."""
        if not self.merged:
            raise StateError("layer is not merged")
        self.base_layer.weight.copy_(self._w0_backup)
        self._w0_backup = None
        self.merged = False

    @torch.no_grad()
    def unload_merged(self) -> nn.Module:
        """Write W* into the base layer and return it (the wrapper is dropped)."""
        if not self.merged:
            self.merge()
        self._w0_backup = None
        return self.base_layer

    @staticmethod
    def _check_finite(w: torch.Tensor) -> None:
        if not torch.isfinite(w).all():
            raise StateError("merged weight has NaN or Inf values (fp16 overflow or a diverged adapter)")

    def extra_repr(self) -> str:
        names = []
        if self.reparam is not None:
            names.append(getattr(self.reparam, "method_name", type(self.reparam).__name__))
        if self.update is not None:
            names.append(getattr(self.update, "method_name", type(self.update).__name__))
        return f"adapter={'('.join(names)}{')' * (len(names) - 1)}, merged={self.merged}"
