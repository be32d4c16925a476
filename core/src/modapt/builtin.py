"""The core's own plugin: the ``additive`` reparam, always present.

``additive`` is what an update gets when no reparam wraps it; naming it in a recipe
(``method = "additive"`` with an ``update``) is the same as writing the update alone.
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .lazy import Lazy
from .methods import Capabilities, Method, Options


class AdditiveOptions(Options):
    pass


@hookimpl
def modapt_register_methods(register):
    register(Method(
        name="additive",
        example={"method": "additive", "targets": ["q_proj", "v_proj"], "update": {"method": "lora", "r": 4}},
        family="reparam",
        options=AdditiveOptions,
        build=Lazy("modapt.update:Additive"),  # torch is imported when a model is built
        own_keys=(),
        capabilities=Capabilities(
            mergeable=True, composes_with=frozenset({"update", "attention", "module"}),
            layer_kinds=frozenset({"linear", "conv1d", "embedding"}), cheap_norm=True),
        description="W = W0 + ΔW (the default reparam)",
    ))


@hookimpl
def modapt_describe():
    return {"description": "modapt core: the additive reparam"}
