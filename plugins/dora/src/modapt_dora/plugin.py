"""Registers the ``dora`` reparam with modapt (entry point ``dora``)."""

from __future__ import annotations

import modapt

from .dora import MAGNITUDE, Dora, DoraOptions

#: PEFT 0.21's format for DoRA over LoRA (``LoraConfig(use_dora=True)``), for modapt-export.
#: A modapt key ``<path>.<key>`` is PEFT's ``base_model.model.<path>.<file key>`` in
#: ``adapter_model.safetensors`` and ``base_model.model.<path>.<live key>`` in a live
#: ``PeftModel``'s ``named_parameters()``. Shapes are equal on both sides, no transpose.
PEFT_FORMAT = {
    "peft_type": "LORA",
    "config": {"use_dora": True},
    "update": "lora",
    "prefix": "base_model.model.",
    "keys": {
        # modapt key: (key in PEFT's adapter file, key in a live PeftModel named "default")
        "lora_A.weight": ("lora_A.weight", "lora_A.default.weight"),
        "lora_B.weight": ("lora_B.weight", "lora_B.default.weight"),
        MAGNITUDE: (MAGNITUDE, f"{MAGNITUDE}.default.weight"),
    },
    "embedding_keys": {
        "lora_A.weight": ("lora_embedding_A", "lora_embedding_A.default"),
        "lora_B.weight": ("lora_embedding_B", "lora_embedding_B.default"),
        MAGNITUDE: (MAGNITUDE, f"{MAGNITUDE}.default.weight"),
    },
}

DORA = modapt.Method(
    name="dora",
    example={"method": "dora", "targets": ["q_proj", "v_proj"], "update": {"method": "lora", "r": 4}},
    family="reparam",
    options=DoraOptions,
    build=Dora,
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
