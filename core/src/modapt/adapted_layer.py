"""The wrapper that replaces an adapted layer at its attribute path."""

from __future__ import annotations

import torch
from torch import nn

from . import layers, quantized
from .errors import StateError


class AdaptedLayer(nn.Module):
    """A layer with a weight adapter: ``reparam(W0, update)`` around ``base_layer``.

    Called exactly like the layer it replaces (any leading shape). ``weight`` and ``bias``
    (and any other attribute, via ``__getattr__``) are the base layer's. The update's and the
    reparam's parameters are registered here, flat: ``lora_A.weight``, ``map_alpha``.

    States: *active* (adapter applied on the fly), *merged* (``merge(unload=False)``: the
    base weight holds W*, the original W0 is kept in ``_w0_backup`` for a bit-exact unmerge).

    A quantized base (:mod:`modapt.quantized`) cannot hold W* in its packed form without
    re-quantizing (lossy, so no exact unmerge): merging swaps in an ``nn.Linear`` holding W*
    (:class:`modapt.quantized.DequantizedLinear`, called like the quantized layer) in the
    layer's compute dtype, and keeps the quantized layer itself aside
    (``quantized_base``, not a submodule: it stays where it is on ``.to()`` and out of state
    dicts); unmerge puts that same object back, so it is exact.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.update = None  # set by modapt.apply; plain objects, their tensors live on self
        self.reparam = None
        self.merged = False
        # None: the single-adapter path below; set by modapt.named when several adapters,
        # ``disabled`` or ``rows`` need routing (a function of (layer, x, ...))
        self._route = None
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
        if self._route is not None:
            return self._route(self, x, *args, **kwargs)
        return self.reparam.forward(x, *args, **kwargs)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W* [out, in] computed in float32 from the unmerged base weight, in the weight's dtype
        (a quantized base's compute dtype: W* is not quantized)."""
        original = self.quantized_base if self.merged and self.quantized_base is not None else self.base_layer
        w0 = layers.weight_of(self.base_layer) if not self.merged else self._canonical_backup()
        dtype = quantized.compute_dtype(original) if layers.is_quantized(original) else w0.dtype
        return self.reparam.merged_weight(w0.float()).to(dtype)

    @property
    def quantized_base(self) -> nn.Module | None:
        """The quantized layer kept aside while merged, else ``None``."""
        return self.__dict__.get("_quantized_base")

    def _canonical_backup(self) -> torch.Tensor:
        if self.quantized_base is not None:
            return layers.weight_of(self.quantized_base)
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
        if layers.is_quantized(self.base_layer):
            original = self.base_layer
            self.base_layer = quantized.plain_linear(original, w_star.dtype, weight=w_star)
            self.__dict__["_quantized_base"] = original
            self.merged = True
            return
        self._w0_backup = self.base_layer.weight.detach().clone()
        self.base_layer.weight.copy_(layers.to_storage(self.base_layer, w_star))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight bit-exactly."""
        if not self.merged:
            raise StateError("layer is not merged")
        if self.quantized_base is not None:
            self.base_layer = self.__dict__.pop("_quantized_base")
            self.merged = False
            return
        self.base_layer.weight.copy_(self._w0_backup)
        self._w0_backup = None
        self.merged = False

    @torch.no_grad()
    def unload_merged(self) -> nn.Module:
        """Write W* into the base layer and return it (the wrapper is dropped)."""
        if not self.merged:
            self.merge()
        self._w0_backup = None
        self.__dict__.pop("_quantized_base", None)
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
