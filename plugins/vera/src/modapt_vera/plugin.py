"""Registers the ``vera`` update method with modapt (entry point ``vera``)."""

from __future__ import annotations

import modapt

from .options import VeraOptions

#: PEFT 0.21's format (``VeraConfig``), for modapt-export. Folders saved with
#: ``save_projection=False`` (A and B regenerated from the key) convert both ways.
VERA_PEFT = modapt.PeftFormat(
    peft_type="VERA",
    keys={"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"},
    options={"r": "r", "projection_prng_key": "projection_prng_key", "d_initial": "d_initial",
             "dropout": "vera_dropout", "save_projection": "save_projection"},
)

VERA = modapt.Method(
    name="vera",
    example={"method": "vera", "r": 8, "targets": ["q_proj", "v_proj"]},
    family="update",
    options=VeraOptions,
    build=modapt.Lazy("modapt_vera.vera:Vera"),
    own_keys=("vera_lambda_b", "vera_lambda_d"),
    capabilities=modapt.Capabilities(
        mergeable=True,
        composes_with=frozenset({"reparam", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d"}),
        cheap_norm=True,
    ),
    description="VeRA: W0 + Λ_b B Λ_d A, A and B frozen random shared by all layers (Kopiczko et al., 2024)",
    peft=VERA_PEFT,
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(VERA)


@modapt.hookimpl
def modapt_describe():
    return {"description": "VeRA, per-layer scaling vectors over shared frozen random projections"}
