"""A test-only update plugin: ΔW = D, a dense [out, in] matrix with no factors.

It has no closed-form norm (``frobenius_sq`` returns ``None``), so MAP over it takes the
materialising fallback; the formula tests use it as "another update" beside LoRA.
"""

from __future__ import annotations

import pydantic
import torch
from torch import nn

import modapt
from modapt import layers


class DenseOptions(modapt.Options):
    std: float = pydantic.Field(0.0, ge=0.0, description="initial N(0, std²) entries of D (0: zeros)")


class Dense(modapt.Update):
    """ΔW = ``dense_delta`` [out, in]."""

    def __init__(self, host, options):
        super().__init__(host, options)
        out_f, in_f = layers.dims_of(host.base_layer)
        host.register_parameter("dense_delta", nn.Parameter(torch.randn(out_f, in_f) * options.std))

    def forward(self, x, base_out, base_layer):
        d = self.host.dense_delta
        if layers.layer_kind(base_layer) == "embedding":
            return layers.embed(base_layer, x, d.t())
        return torch.nn.functional.linear(x.to(d.dtype), d)

    def delta_weight(self, w0):
        return self.host.dense_delta.to(w0.dtype)


DENSE = modapt.Method(
    name="dense", family="update", options=DenseOptions, build=Dense, own_keys=("dense_delta",),
    capabilities=modapt.Capabilities(mergeable=True, composes_with=frozenset({"reparam"}),
                                     layer_kinds=frozenset({"linear", "conv1d", "embedding"})),
    description="test-only dense update",
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(DENSE)
