"""The weight-adapter contract: updates produce ΔW, reparams combine W0 with an update.

A weight adapter on one layer is ``reparam(W0, update)`` (docs/architecture.md): LoRA is
``additive(lora)``, LoMAP is ``map(lora)``, DoRA is ``dora(lora)``. Both objects keep their
parameters on the *host*, the :class:`modapt.AdaptedLayer` that replaced the layer, so that
parameter names are flat and identical in ``named_parameters()``, ``state_dict()`` and the
adapter file: ``q_proj.lora_A.weight``, ``q_proj.map_alpha``. They are plain objects, not
modules: everything ``.to()``, ``state_dict()`` or FSDP must see is registered once, on
the host, and read back from it at call time.
"""

from __future__ import annotations

import torch
from torch import nn

from . import layers


class Update:
    """Base class of an update method (family ``update``): the change ΔW of one weight.

    Subclasses create their parameters in ``__init__`` with ``host.register_parameter`` or
    ``host.add_module`` (never as attributes of ``self``), and read them as ``self.host.X``.
    All weights are canonical, [out, in] (see :mod:`modapt.layers`).
    """

    #: Capability read by fused paths (MAP's one-node layer): ``forward(x)`` is exactly
    #: ``input_dropout(x) @ Rᵀ @ Lᵀ`` with ``(L, R) = factors()``, and the factors are cheap
    #: (k×in and out×k work). Not inherited: each class declares it in its own body, since a
    #: subclass may change ``forward`` (see ``__init_subclass__``).
    fused_low_rank: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.fused_low_rank = bool(cls.__dict__.get("fused_low_rank", False))

    def __init__(self, host: nn.Module, options):
        self.host = host
        self.options = options

    @property
    def input_dropout(self) -> nn.Module | None:
        """The dropout module applied to the update's input ``x`` (on the host), or ``None``.

        Fused paths read it to know whether dropout acts on this call (they keep the general
        path when it does); the module's name on the host is the update's own choice.
        """
        return None

    @property
    def base_layer(self) -> nn.Module:
        return self.host.base_layer

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """ΔW applied to ``x``: shape of ``base_out`` ([..., out]), without building ΔW.

        ``base_out`` is ``W0 x + b`` (already computed by the reparam; LoRMA reuses it).
        """
        raise NotImplementedError

    def layer_output(self, x: torch.Tensor, base_layer: nn.Module, *args, **kwargs) -> torch.Tensor | None:
        """The whole additive layer output ``(W0 + ΔW) x + b`` [..., out], or ``None`` (the default).

        Optional. An update whose cheapest exact training path replaces the base matmul rather
        than adding to it (LoRMAπ on a wide layer: one GEMM with ``T·W0`` instead of ``T`` applied
        to ``W0 x``) returns the output here; :class:`Additive` then skips its own base call.
        Other reparams (MAP, DoRA) need ``W0 x`` and ``ΔW x`` apart and never call it.
        """
        return None

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """ΔW [out, in] for merges; ``w0`` [out, in] is the base weight (LoRMA needs it)."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L [out, k], R [k, in]) with ΔW = L @ R (scaling included), or ``None``.

        Low-rank updates offer this; it gives ``frobenius_sq`` and DoRA's row norms in
        k×k and out×k work instead of out×in.
        """
        return None

    def frobenius_sq(self, w0: torch.Tensor) -> torch.Tensor | None:
        """‖ΔW‖_F² as a scalar tensor in closed form, or ``None`` when there is no cheap form.

        The default uses :meth:`factors`: ‖L R‖_F² = trace((LᵀL)(R Rᵀ)) = sum((LᵀL) ⊙ (R Rᵀ)).
        """
        fac = self.factors()
        if fac is None:
            return None
        left, right = fac
        return ((left.t() @ left) * (right @ right.t())).sum()

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter tensors to save with the adapter (AdaLoRA's rank masks). Default none."""
        return {}


class Reparam:
    """Base class of a reparametrisation (family ``reparam``): how W0 and an update combine.

    Parameters live on the host like an update's (``map_alpha``, ``lora_magnitude_vector``).
    """

    def __init__(self, host: nn.Module, options, update: Update):
        self.host = host
        self.options = options
        self.update = update

    @property
    def base_layer(self) -> nn.Module:
        return self.host.base_layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The adapted layer's output for input ``x`` (any leading shape), bias included."""
        raise NotImplementedError

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W* [out, in], the weight that the merged layer uses. Computed in ``w0``'s dtype."""
        raise NotImplementedError


class Additive(Reparam):
    """``W = W0 + ΔW``: the default reparam (LoRA is ``additive(lora)``).

    ``sums_with_others``: several active adapters on one layer add their ΔW x to one W0 x + b
    (:mod:`modapt.named`); an update declaring ``rescales_weight = True`` (ΔW = T·W0, a
    multiplicative form) opts out and must be the layer's only active adapter.
    """

    @property
    def sums_with_others(self) -> bool:
        return not getattr(self.update, "rescales_weight", False)

    def forward(self, x, *args, **kwargs):
        whole = self.update.layer_output(x, self.base_layer, *args, **kwargs)
        if whole is not None:
            return whole
        base_out = self.base_layer(x, *args, **kwargs)
        delta = self.update.forward(x, base_out, self.base_layer)
        return base_out + delta.to(base_out.dtype)

    def merged_weight(self, w0):
        return w0 + self.update.delta_weight(w0)


def canonical_weight(host_or_layer: nn.Module) -> torch.Tensor:
    """W0 [out, in] of a host's base layer (or of a plain layer)."""
    layer = getattr(host_or_layer, "base_layer", host_or_layer)
    return layers.weight_of(layer)
