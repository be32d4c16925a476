"""The modapt plugin of LMAM (entry point ``lmam = "modapt_lmam.plugin"``)."""

from __future__ import annotations

import modapt

from .options import LmamOptions

LMAM = modapt.Method(
    name="lmam",
    example={"method": "lmam"},
    family="attention",
    options=LmamOptions,
    build=modapt.Lazy("modapt_lmam.attachment:build"),
    own_keys=("lmam_Wa", "lmam_Wb", "lmam_W"),  # attention_map.WA, WB, W_FULL (a test compares)
    capabilities=modapt.Capabilities(
        mergeable=False,
        exportable=True,
        identity_at_init=True,
        composes_with=frozenset({"update", "reparam", "module"}),
        layer_kinds=frozenset(),
    ),
    description="LMAM: softmax(QKᵀ/√d) + ((W_a+P_a)(W_b+P_b))·s on the attention map (LoRaDA)",
    default_targets=modapt.Lazy("modapt_lmam.targets:attention_modules"),
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(LMAM)


@modapt.hookimpl
def modapt_prepare_export(model, task):
    from . import export  # torch: imported when a model is exported, not at registry load

    export.prepare(model)


@modapt.hookimpl
def modapt_describe():
    return {"description": "LMAM, low-rank multi-head attention-map adaptation (LoRaDA); "
                           "tested on LLaMA (GQA), GPT-2 and BERT"}
