"""modapt: parameter-efficient fine-tuning adapters as plugins.

The public API (docs/architecture.md, "Names that are a contract")::

    model = modapt.apply(model, recipe)      # same object, adapters in place, base frozen
    modapt.trainable_parameters(model)       # {name: parameter}
    modapt.save(model, "adapter/")           # atomic; also a PEFT folder for LoRA/DoRA/AdaLoRA
    model = modapt.load(base_model, "adapter/")
    modapt.merge(model, unload=True)         # fold weight adapters into the base weights
    modapt.merge(model, unload=False); modapt.unmerge(model)   # bit-exact round trip
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import TYPE_CHECKING

# light at import (pydantic and pluggy, no torch): what plugins need to declare themselves
from .errors import AdapterLoadError, ModaptError, PluginError, RecipeError, StateError, TargetError
from .hookspecs import hookimpl, hookspec
from .fast_path_switches import fast_paths
from .lazy import Lazy, lazy_exports
from .methods import Capabilities, Method, Options, PeftFormat
from .registry import Registry, default_registry, use_registry

# the rest imports torch and transformers: loaded on first use (module __getattr__, PEP 562), so
# that `modapt --help`, `modapt recipe check` and plugins' option modules start fast
_LAZY = {
    "AdaptedLayer": "adapted_layer",
    "AdapterState": "apply", "adapter_info": "apply", "adapter_state_dict": "apply", "apply": "apply",
    "is_adapted": "apply", "merge": "apply", "remove": "apply", "state_of": "apply",
    "trainable_parameters": "apply", "unmerge": "apply",
    "Attachment": "attachment",
    "active": "named", "adapters": "named", "combine": "named", "delete": "named", "disabled": "named",
    "rows": "named", "set_active": "named",
    "load": "persistence", "save": "persistence",
    "AdapterSpec": "recipe", "Recipe": "recipe", "parse_recipe": "recipe", "read_recipe_file": "recipe",
    "write_recipe": "recipe",
    "after_optimizer_step": "training", "before_optimizer_step": "training", "regularization_loss": "training",
    "load_training_state": "training", "save_training_state": "training", "TrainingState": "training",
    "Additive": "update", "Reparam": "update", "Update": "update",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time these come from __getattr__
    from .adapted_layer import AdaptedLayer
    from .apply import (AdapterState, adapter_info, adapter_state_dict, apply, is_adapted, merge, remove, state_of,
                        trainable_parameters, unmerge)
    from .attachment import Attachment
    from .named import active, adapters, combine, delete, disabled, rows, set_active
    from .persistence import load, save
    from .recipe import AdapterSpec, Recipe, parse_recipe, read_recipe_file, write_recipe
    from .training import (TrainingState, after_optimizer_step, before_optimizer_step, load_training_state,
                           regularization_loss, save_training_state)
    from .update import Additive, Reparam, Update


def __getattr__(name: str):
    """Import the submodule that holds ``name`` on first use (``modapt.apply``, ``modapt.layers``...)."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # once: later lookups are plain attribute reads
        return value
    if not name.startswith("__"):
        try:  # a submodule used as an attribute (modapt.persistence.read_config) after a bare `import modapt`
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``modapt.apply`` the function when the submodule ``modapt.apply`` is imported later.

    The import system sets a package attribute for every submodule it loads; eager imports used
    to overwrite it with the function afterwards, and this keeps that outcome with lazy ones.
    """

    def __setattr__(self, name: str, value) -> None:
        if _LAZY.get(name) == name and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules["modapt.apply"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


try:
    __version__ = importlib.metadata.version("modapt")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AdaptedLayer", "AdapterLoadError", "AdapterSpec", "AdapterState", "Additive", "Attachment", "Capabilities",
    "Lazy", "Method", "ModaptError", "Options", "PeftFormat", "PluginError", "Recipe", "RecipeError", "Registry", "Reparam",
    "StateError", "TargetError", "Update", "active", "adapter_info", "adapters", "combine", "delete", "disabled", "adapter_state_dict", "after_optimizer_step", "apply",
    "before_optimizer_step", "default_registry", "fast_paths", "hookimpl", "hookspec", "is_adapted", "lazy_exports", "load", "merge",
    "parse_recipe", "read_recipe_file", "regularization_loss", "remove", "save_training_state", "load_training_state", "TrainingState", "rows", "save", "set_active", "state_of",
    "trainable_parameters", "unmerge", "use_registry", "write_recipe",
]
