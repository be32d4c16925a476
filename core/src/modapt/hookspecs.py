"""The contract between modapt and its plugins: every hook a plugin may implement.

A plugin is a module (or any object) with functions named after these hooks and marked
with :data:`modapt.hookimpl`. Plugins are found through the entry-point group ``modapt``;
the entry-point name is the plugin's short name (``lora``, ``map``), the one that
``MODAPT_PLUGINS=lora,map`` lists. The core's own LoRA registers through these same hooks.

Rules every hook shares:

- Only names starting with ``modapt_`` are hooks. After loading, the plugin manager calls
  ``check_pending()``, so a function marked ``hookimpl`` whose name is not a hook below
  (a typo such as ``modapt_register_method``) is an error, not silence.
- Registration hooks receive a ``register`` callback instead of returning values, so the
  registry knows which distribution supplied what, and a name collision can name both.
- A hook that raises is reported with the plugin's distribution name; the other plugins keep
  working (see ``modapt plugins``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:  # annotations only: methods/recipe/registry import this module
    import torch
    from torch import nn

    from .methods import Method
    from .recipe import Recipe
    from .registry import Registry
    from .training import TrainingState

PROJECT = "modapt"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterMethod(Protocol):
    """The ``register`` callback of :func:`modapt_register_methods`."""

    def __call__(self, method: Method) -> None: ...


class RegisterPreset(Protocol):
    """The ``register`` callback of :func:`modapt_register_presets`."""

    def __call__(self, name: str, recipe: Mapping[str, Any], *, citation: str, description: str = "") -> None: ...


class RegisterCommand(Protocol):
    """The ``register`` callback of :func:`modapt_register_commands`."""

    def __call__(self, name: str, configure: Callable[[argparse.ArgumentParser], None], *, help: str) -> None: ...


@hookspec
def modapt_register_methods(register: RegisterMethod) -> None:
    """Register the adapter methods this plugin provides.

    Called once per registry, when the registry is first used (loading is lazy).

    :param register: ``register(method)`` where ``method`` is a :class:`modapt.Method`: its
        name, family (``update``, ``reparam``, ``attention`` or ``module``), option schema,
        builder and capabilities. Registering a name that another plugin registered raises
        :class:`modapt.PluginError` naming both distributions.
    :return: ignored.

    A plugin must not touch any model here, nor import heavy optional dependencies.
    """


@hookspec
def modapt_register_presets(register: RegisterPreset) -> None:
    """Register named compositions (presets) of methods.

    Called once per registry, after every plugin's methods are registered. Only the composers
    plugin registers presets (docs/architecture.md); preset names are a namespace separate from methods.

    :param register: ``register(name, recipe, *, citation, description="")``: ``recipe`` is
        a recipe mapping (``{"adapter": [...]}``) that may name methods that are not
        installed; using such a preset is an error naming the distributions to install.
    :return: ignored.
    """


@hookspec
def modapt_register_commands(register: RegisterCommand) -> None:
    """Add subcommands to the one ``modapt`` command line.

    Called when the CLI starts, before arguments are parsed.

    :param register: ``register(name, configure, *, help)``: ``configure(parser)`` receives
        an :class:`argparse.ArgumentParser` for ``modapt NAME``; it adds arguments (or nested
        subparsers) and sets ``parser.set_defaults(run=fn)`` where ``fn(args) -> int`` returns
        the exit code (0 ok, 1 invalid input, 2 usage). Raise :class:`modapt.ModaptError` for
        user errors: the CLI prints them without a traceback and exits 1.
    :return: ignored.

    Names are unique across plugins; the core owns ``plugins``, ``recipe``, ``train``.
    """


@hookspec
def modapt_validate_recipe(recipe: Recipe, registry: Registry) -> None:
    """Check a resolved recipe before any model is touched.

    Called by :func:`modapt.recipe.parse_recipe` after every adapter entry was validated on its
    own, for every plugin (not firstresult). The composers plugin uses it for the rules of
    composition (which families stack on one module).

    :param recipe: the resolved :class:`modapt.Recipe`.
    :param registry: the :class:`modapt.Registry` (capabilities of every method).
    :return: ignored; refuse by raising :class:`modapt.RecipeError` naming the key path.

    A plugin must not mutate the recipe.
    """


@hookspec
def modapt_regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """Contribute a term to the training loss (AdaLoRA's orthogonality regulariser).

    Called by :func:`modapt.regularization_loss` once per training step, for every plugin;
    the terms returned are summed.

    :param model: a model prepared by :func:`modapt.apply`.
    :return: a scalar tensor on the model's device (already weighted), or ``None`` when this
        plugin has nothing to add for this model.
    """


@hookspec
def modapt_before_optimizer_step(model: nn.Module, step: int) -> None:
    """Act after ``backward()`` and before ``optimizer.step()``.

    Called by :func:`modapt.before_optimizer_step` (the training loop and the
    ``TrainerCallback`` call it), for every plugin. Gradients are populated. MAP's stepwise
    schedule zeroes the gradients of the group that rests this step here.

    :param model: a model prepared by :func:`modapt.apply`.
    :param step: the 0-based index of the optimizer step about to run.
    :return: ignored.
    """


@hookspec
def modapt_after_optimizer_step(model: nn.Module, step: int) -> None:
    """Act after ``optimizer.step()`` and before gradients are zeroed.

    Called by :func:`modapt.after_optimizer_step`, for every plugin. AdaLoRA's importance
    scores and rank allocation run here (they read the gradients of the step just taken).

    :param model: a model prepared by :func:`modapt.apply`.
    :param step: the 0-based index of the optimizer step that just ran.
    :return: ignored.
    """


@hookspec
def modapt_training_state(model: nn.Module) -> TrainingState | None:
    """Hand over this plugin's training state kept outside the adapter tensors, for a checkpoint.

    Called by :func:`modapt.save_training_state` (every Trainer checkpoint, ``modapt train``'s
    resumable checkpoints), for every plugin. What the adapter tensors already hold (AdaLoRA's
    Λ and ``rank_pattern`` buffer) and what follows from the step number alone (MAP's stepwise
    schedule) is not training state; what a resumed run would otherwise recompute differently
    is (AdaLoRA's importance averages and current budget).

    :param model: a model prepared by :func:`modapt.apply` (active adapters only).
    :return: a :class:`modapt.training.TrainingState` named after the plugin, tensors in
        ``tensors`` (written as safetensors) and JSON values in ``values``; ``None`` when there
        is nothing to keep for this model.
    """


@hookspec
def modapt_load_training_state(model: nn.Module, states: Mapping[str, TrainingState]) -> str | None:
    """Take back the state this plugin handed over in :func:`modapt_training_state`.

    Called by :func:`modapt.load_training_state` (resuming a Trainer or ``modapt train``), for
    every plugin, with every plugin's state read from the checkpoint.

    :param model: the model being resumed, with its adapter tensors already restored.
    :param states: plugin name -> its saved state.
    :return: the name of the state this plugin consumed, else ``None``. A state no plugin
        consumes is refused by the core (its plugin is missing); a state that does not fit the
        model (other layers, other shapes) must be refused with a one-line
        :class:`modapt.StateError` naming what differs.
    """


@hookspec
def modapt_prepare_export(model: nn.Module, task: str) -> None:
    """Make a plugin's modules traceable by ``torch.onnx.export(dynamo=True)``.

    Called by the exporter on a merged model just before export, for every plugin. LMAM
    switches its attention to the export-safe path with its precomputed constant map here.

    :param model: the merged model about to be exported (weight adapters already folded).
    :param task: ``"sequence-classification"``, ``"causal-lm"`` or ``"feature-extraction"``.
    :return: ignored.
    """


@hookspec
def modapt_patch_onnx(onnx_model: Any, model: nn.Module, task: str) -> None:
    """Patch the exported ONNX graph (an :class:`onnx.ModelProto`) in place.

    Called by the exporter after ``torch.onnx.export`` and before verification, for every
    plugin. Most plugins need nothing here: what they add is already in the traced graph.

    :param onnx_model: the exported graph.
    :param model: the model that was exported.
    :param task: as in :func:`modapt_prepare_export`.
    :return: ignored. The verification that follows compares ONNX Runtime against PyTorch,
        so a wrong patch fails loudly.
    """


@hookspec
def modapt_describe() -> dict[str, Any] | None:
    """Describe this plugin for ``modapt plugins``.

    Called when the plugin list is shown, for every plugin.

    :return: a dict such as ``{"description": "...", "homepage": "..."}``, or ``None``.
    """
