"""Registers the ``dora`` reparam with modapt (entry point ``dora``)."""

from __future__ import annotations

import modapt

from .options import MAGNITUDE, DoraOptions

#: PEFT 0.21's format for DoRA over LoRA (``LoraConfig(use_dora=True)``), for modapt-export.
#: A modapt key ``<path>.<key>`` is PEFT's ``base_model.model.<path>.<file key>`` in
#: ``adapter_model.safetensors`` and ``base_model.model.<path>.<live key>`` in a live
#: ``PeftModel``'s ``named_parameters()``. Shapes are equal on both sides, no transpose.
PEFT_FORMAT = modapt.PeftFormat(
    peft_type="LORA",
    config={"use_dora": True},  # PEFT's LoRA with use_dora: DoRA over LoRA
    # PEFT stores LoRA's factors beside the magnitude: modapt key -> key in PEFT's adapter file
    keys={"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight", MAGNITUDE: MAGNITUDE},
    embedding_keys={"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B",
                    MAGNITUDE: MAGNITUDE},
)

DORA = modapt.Method(
    name="dora",
    example={"method": "dora", "targets": ["q_proj", "v_proj"], "update": {"method": "lora", "r": 4}},
    family="reparam",
    options=DoraOptions,
    build=modapt.Lazy("modapt_dora.dora:Dora"),
    own_keys=(MAGNITUDE,),
    capabilities=modapt.Capabilities(
        mergeable=True,
        composes_with=frozenset({"update", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d", "embedding"}),
    ),
    description="DoRA: m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row, over LoRA by default (Liu et al., 2024)",
    default_update={"method": "lora"},
    peft=PEFT_FORMAT,
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(DORA)


@modapt.hookimpl
def modapt_describe():
    return {"description": "DoRA, weight-decomposed low-rank adaptation (a reparam over any update)"}
