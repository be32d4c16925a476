"""modapt: parameter-efficient fine-tuning adapters as plugins.

The public API (DESIGN.md, "Fixed names and behaviours")::

    model = modapt.apply(model, recipe)      # same object, adapters in place, base frozen
    modapt.trainable_parameters(model)       # {name: parameter}
    modapt.save(model, "adapter/")           # adapter_config.json + adapter_model.safetensors
    model = modapt.load(base_model, "adapter/")
    modapt.merge(model, unload=True)         # fold weight adapters into the base weights
    modapt.merge(model, unload=False); modapt.unmerge(model)   # bit-exact round trip
"""

from __future__ import annotations

import importlib.metadata

from .adapted_layer import AdaptedLayer
from .apply import (
    AdapterState,
    adapter_info,
    adapter_state_dict,
    apply,
    is_adapted,
    merge,
    remove,
    state_of,
    trainable_parameters,
    unmerge,
)
from .attachment import Attachment
from .errors import AdapterLoadError, ModaptError, PluginError, RecipeError, StateError, TargetError
from .hookspecs import hookimpl, hookspec
from .named import active, adapters, combine, delete, disabled, rows, set_active
from .methods import Capabilities, Method, Options
from .persistence import load, save
from .recipe import AdapterSpec, Recipe, parse_recipe, read_recipe_file, write_recipe
from .registry import Registry, default_registry, use_registry
from .training import after_optimizer_step, before_optimizer_step, regularization_loss
from .update import Additive, Reparam, Update

try:
    __version__ = importlib.metadata.version("modapt")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AdaptedLayer", "AdapterLoadError", "AdapterSpec", "AdapterState", "Additive", "Attachment", "Capabilities",
    "Method", "ModaptError", "Options", "PluginError", "Recipe", "RecipeError", "Registry", "Reparam",
    "StateError", "TargetError", "Update", "active", "adapter_info", "adapters", "combine", "delete", "disabled", "adapter_state_dict", "after_optimizer_step", "apply",
    "before_optimizer_step", "default_registry", "hookimpl", "hookspec", "is_adapted", "load", "merge",
    "parse_recipe", "read_recipe_file", "regularization_loss", "remove", "rows", "save", "set_active", "state_of",
    "trainable_parameters", "unmerge", "use_registry", "write_recipe",
]
