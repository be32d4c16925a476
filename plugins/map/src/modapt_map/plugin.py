"""The entry point of modapt-map (``map = "modapt_map.plugin"``): registers ``method = "map"``."""

from __future__ import annotations

import modapt

from .options import MapOptions

MAP = modapt.Method(
    name="map",
    example={"method": "map", "targets": ["q_proj", "v_proj"], "update": {"method": "lora", "r": 4}},
    family="reparam",
    options=MapOptions,
    build=modapt.Lazy("modapt_map.reparam:Map"),
    own_keys=("map_alpha", "map_beta"),
    capabilities=modapt.Capabilities(
        mergeable=True,
        # W* = W0 at init with either init when the update is zero at init (its own flag says so)
        identity_at_init=True,
        composes_with=frozenset({"update", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d", "embedding"}),
    ),
    description="MAP: α·W0/‖W0‖_F + β·ΔW/‖ΔW‖_F over any update (Si et al., 2025); LoMAP = map over lora",
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(MAP)


@modapt.hookimpl
def modapt_before_optimizer_step(model, step):
    from .schedule import rest_gradients  # torch: imported when a model trains, not at registry load

    rest_gradients(model, step)


@modapt.hookimpl
def modapt_describe():
    return {"description": "MAP reparametrisation (LoMAP, AdaLoMAP, FLoMAP): direction and magnitude of W as a vector"}
