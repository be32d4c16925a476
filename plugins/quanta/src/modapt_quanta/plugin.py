"""Registers the ``quanta`` update method with modapt (entry point ``quanta``)."""

from __future__ import annotations

import modapt

from .options import QuantaOptions

QUANTA = modapt.Method(
    name="quanta",
    example={"method": "quanta", "targets": ["q_proj", "v_proj"]},
    family="update",
    options=QuantaOptions,
    build=modapt.Lazy("modapt_quanta.quanta:Quanta"),
    own_keys=("quanta_theta",),
    capabilities=modapt.Capabilities(
        mergeable=True,
        composes_with=frozenset({"reparam", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d"}),
        cheap_norm=False,
    ),
    description="QuanTA: W0 + T(θ) − T(θ0), a circuit of small tensors on a factorised dimension (Chen et al., 2024)",
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(QUANTA)


@modapt.hookimpl
def modapt_describe():
    return {"description": "QuanTA, high-rank updates from a circuit of small tensors"}
