"""Registers the ``flora`` update method with modapt (entry point ``flora``)."""

from __future__ import annotations

import modapt

from .options import FloraOptions

FLORA = modapt.Method(
    name="flora",
    example={"method": "flora", "r": 4, "targets": ["q_proj", "v_proj"]},
    family="update",
    options=FloraOptions,
    build=modapt.Lazy("modapt_flora.flora:Flora"),
    own_keys=("flora_A", "flora_G", "flora_B"),
    capabilities=modapt.Capabilities(
        mergeable=True,
        composes_with=frozenset({"reparam", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d"}),
        cheap_norm=True,
    ),
    description="FLoRA: W0 + (lora_alpha/r) · B G A with a trainable r×r core (Si et al., 2025)",
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(FLORA)


@modapt.hookimpl
def modapt_describe():
    return {"description": "FLoRA, a Tucker-form low-rank update with an r×r core"}
