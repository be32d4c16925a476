"""The modapt plugin of LMAM (entry point ``lmam = "modapt_lmam.plugin"``)."""

from __future__ import annotations

import modapt

from . import attention_map, export, targets
from .attachment import build
from .options import LmamOptions

LMAM = modapt.Method(
    name="lmam",
    example={"method": "lmam"},
    family="attention",
    options=LmamOptions,
    build=build,
    own_keys=(attention_map.WA, attention_map.WB, attention_map.W_FULL),
    capabilities=modapt.Capabilities(
        mergeable=False,
        exportable=True,
        identity_at_init=True,
        composes_with=frozenset({"update", "reparam", "module"}),
        layer_kinds=frozenset(),
    ),
    description="LMAM: softmax(QKᵀ/√d) + ((W_a+P_a)(W_b+P_b))·s on the attention map (LoRaDA)",
    default_targets=targets.attention_modules,
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(LMAM)


@modapt.hookimpl
def modapt_prepare_export(model, task):
    export.prepare(model)


@modapt.hookimpl
def modapt_describe():
    return {"description": "LMAM, low-rank multi-head attention-map adaptation (LoRaDA); "
                           "tested on LLaMA (GQA), GPT-2 and BERT"}
