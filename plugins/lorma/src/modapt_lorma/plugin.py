"""The modapt plugin of LoRMA (entry point ``lorma = "modapt_lorma.plugin"``)."""

from __future__ import annotations

import modapt
from modapt import Capabilities, Lazy, Method, hookimpl

from .options import LormaOptions

LORMA = Method(
    name="lorma",
    example={"method": "lorma", "r": 4, "targets": ["q_proj", "v_proj"]},
    family="update",
    options=LormaOptions,
    build=Lazy("modapt_lorma.update:Lorma"),
    own_keys=("lorma_A", "lorma_B"),
    capabilities=Capabilities(
        mergeable=True,
        # the default recipe (inflation = "plus", or "pi") starts at T = I; "none" cannot (rank ≤ r)
        identity_at_init=True,
        composes_with=frozenset({"reparam", "attention", "module"}),
        # embeddings only with side = "pre" (build refuses "post": T would be vocabulary-sized)
        layer_kinds=frozenset({"linear", "conv1d", "embedding"}),
        # closed forms for "plus" and "none"; "pi" returns None from frobenius_sq (no cheap form)
        cheap_norm=False,
    ),
    description="LoRMA: W = T·W0 or W0·T, T = I + s·BA | s·Iπ(BA) | s·BA (Bihany et al., 2025)",
)


@hookimpl
def modapt_register_methods(register):
    register(LORMA)


@hookimpl
def modapt_after_optimizer_step(model, step):
    if modapt.is_adapted(model):
        from .rank_monitor import record_from_hook  # torch: imported when a model trains

        record_from_hook(model, step)


@hookimpl
def modapt_describe():
    return {"description": "LoRMA: low-rank multiplicative adaptation (plus, pi, none; pre/post), "
                           "with a rank monitor"}
