"""LoRA, the reference method: ``W = W0 + s · B A`` with ``s = lora_alpha / r``.

Numerics follow PEFT 0.21: A [r, in] Kaiming-uniform (a = √5), B [out, r] zeros, dropout on
the adapter's input only, rsLoRA's ``s = lora_alpha / √r`` as an option. Embeddings (a linear
map from one-hot ids, see :mod:`modapt.layers`) get A [r, num_embeddings] zeros and
B [dim, r] normal, and no dropout, as in PEFT. Parameters ``lora_A.weight``, ``lora_B.weight``.

This module is the entry point ``lora`` and imports no torch: the options, the ``Method`` and
the hooks; the update itself is :class:`modapt.lora_update.Lora`, imported when a model is
built (``modapt.lora.Lora`` still names it, loaded on first use).
"""

from __future__ import annotations

import importlib
import math

import pydantic

from .hookspecs import hookimpl
from .lazy import Lazy
from .methods import Capabilities, Method, Options


class LoraOptions(Options):
    r: int = pydantic.Field(8, gt=0, description="rank of the update")
    lora_alpha: float = pydantic.Field(8.0, gt=0, description="scaling numerator: s = lora_alpha / r")
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    use_rslora: bool = pydantic.Field(False, description="s = lora_alpha / sqrt(r) (rank-stabilised LoRA)")


def scaling(options) -> float:
    """The scale ``s`` of LoRA-style updates: ``lora_alpha / r``, or ``/ √r`` with rsLoRA."""
    return options.lora_alpha / (math.sqrt(options.r) if getattr(options, "use_rslora", False) else options.r)


LORA = Method(
    name="lora",
    example={"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]},
    family="update",
    options=LoraOptions,
    build=Lazy("modapt.lora_update:Lora"),
    own_keys=("lora_A.weight", "lora_B.weight"),
    capabilities=Capabilities(
        mergeable=True,
        composes_with=frozenset({"reparam", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d", "embedding"}),
        cheap_norm=True,
    ),
    description="LoRA: W0 + (lora_alpha/r) · B A (Hu et al., 2021)",
)


@hookimpl
def modapt_register_methods(register):
    register(LORA)


@hookimpl
def modapt_describe():
    return {"description": "LoRA, the reference method (built into the core distribution)"}


def __getattr__(name: str):
    """``modapt.lora.Lora`` (and the rest of :mod:`modapt.lora_update`), imported on first use."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__package__}.lora_update"), name)
