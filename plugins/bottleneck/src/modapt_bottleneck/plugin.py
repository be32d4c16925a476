"""Registers the ``bottleneck`` module method with modapt (entry point ``bottleneck``)."""

from __future__ import annotations

import modapt

from .options import BottleneckOptions

BOTTLENECK = modapt.Method(
    name="bottleneck",
    example={"method": "bottleneck"},
    family="module",
    options=BottleneckOptions,
    build=modapt.Lazy("modapt_bottleneck.attachment:build"),
    own_keys=("adapter_attn", "adapter_ffn"),
    capabilities=modapt.Capabilities(
        mergeable=False,
        exportable=True,
        composes_with=frozenset({"update", "reparam", "attention"}),
        layer_kinds=frozenset(),
    ),
    description="Bottleneck adapters: series (Houlsby), parallel (He et al.), Adapter-FFN",
    default_targets=modapt.Lazy("modapt_bottleneck.sites:find_blocks"),
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(BOTTLENECK)


@modapt.hookimpl
def modapt_describe():
    return {"description": "bottleneck adapters on the residual path of transformer blocks"}
