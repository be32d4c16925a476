"""The plugin module named by the entry point: it registers the ``ia3`` method.

It imports no torch, so that ``modapt plugins`` and ``modapt recipe check`` stay fast: the
options come from :mod:`modapt_ia3.options`, and ``build`` names the torch class
(:class:`modapt_ia3.ia3.Ia3`) as a :class:`modapt.Lazy`, imported when a model is built.
"""

from __future__ import annotations

import modapt

from .options import Ia3Options

IA3 = modapt.Method(
    name="ia3",
    family="update",
    options=Ia3Options,
    build=modapt.Lazy("modapt_ia3.ia3:Ia3"),
    own_keys=("ia3_l",),
    capabilities=modapt.Capabilities(
        mergeable=True,                # delta_weight folds into W0
        exportable=True,
        identity_at_init=True,         # l = 1
        composes_with=frozenset({"reparam", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d"}),
        cheap_norm=False,              # no closed-form ‖ΔW‖: MAP over IA3 materialises ΔW
    ),
    description="IA3: learned rescaling of a layer's outputs or inputs (Liu et al., 2022)",
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(IA3)


@modapt.hookimpl
def modapt_describe():
    return {"description": "IA3, the out-of-tree plugin template"}
