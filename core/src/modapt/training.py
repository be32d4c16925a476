"""The training-time hooks, for any loop: plain PyTorch, ``modapt train``, or a HF Trainer.

A loop calls, per step::

    loss = task_loss + modapt.regularization_loss(model)
    loss.backward()
    modapt.before_optimizer_step(model, step)
    optimizer.step()
    modapt.after_optimizer_step(model, step)
    optimizer.zero_grad()

Plugins act through these without the loop knowing them: AdaLoRA's regulariser and rank
allocation, MAP's stepwise schedule, LoRMA's rank monitor.

State a plugin keeps between steps outside the adapter tensors (AdaLoRA's importance averages
and budget) goes into checkpoints through :func:`save_training_state` /
:func:`load_training_state`: one safetensors file, ``modapt_training_state.safetensors``, whose
tensors are named ``<plugin>/<name>`` and whose metadata holds each plugin's JSON values. One
file, replaced in one rename, so a checkpoint never holds half of it; no pickle, since a
checkpoint may come from someone else.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import StateError

from .named import hook_view
from .registry import Registry, default_registry


def regularization_loss(model: nn.Module, *, registry: Registry | None = None) -> torch.Tensor:
    """The sum of every plugin's regularisation term for ``model`` (a 0-dim tensor, 0 if none)."""
    registry = registry or default_registry()
    with hook_view(model):  # several named adapters: the hooks act on the active ones only
        terms = [t for t in registry.call("modapt_regularization_loss", model=model) if t is not None]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack([t.float() for t in terms]).sum()


def before_optimizer_step(model: nn.Module, step: int, *, registry: Registry | None = None) -> None:
    """Let plugins act on the gradients of ``step`` before the optimizer uses them."""
    with hook_view(model):
        (registry or default_registry()).call("modapt_before_optimizer_step", model=model, step=step)


def after_optimizer_step(model: nn.Module, step: int, *, registry: Registry | None = None) -> None:
    """Let plugins act after the optimizer step ``step`` (gradients still present)."""
    with hook_view(model):
        (registry or default_registry()).call("modapt_after_optimizer_step", model=model, step=step)


TRAINING_STATE_FILE = "modapt_training_state.safetensors"
_METADATA_KEY = "modapt_training_state"  # the safetensors metadata entry holding the JSON values
_FORMAT = 1


@dataclass
class TrainingState:
    """One plugin's training state: ``tensors`` (name -> tensor, any shapes) and JSON ``values``."""

    plugin: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


def training_states(model: nn.Module, *, registry: Registry | None = None) -> dict[str, TrainingState]:
    """plugin name -> its :class:`TrainingState`, for every plugin that has some for ``model``."""
    registry = registry or default_registry()
    with hook_view(model):
        found = [s for s in registry.call("modapt_training_state", model=model) if s is not None]
    states: dict[str, TrainingState] = {}
    for state in found:
        if state.plugin in states:
            raise StateError(f"two plugins hand over training state under the name '{state.plugin}'")
        states[state.plugin] = state
    return states


def save_training_state(model: nn.Module, folder: str | os.PathLike, *, registry: Registry | None = None) -> Path | None:
    """Write every plugin's training state to ``folder/modapt_training_state.safetensors``.

    Written beside the file and renamed over it (one rename: the old or the new state, never a
    mix). With no state to keep, an older file there is removed (it belongs to another run) and
    ``None`` is returned; else the file's path.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    path = folder / TRAINING_STATE_FILE
    states = training_states(model, registry=registry)
    if not states:
        path.unlink(missing_ok=True)
        return None
    tensors = {f"{name}/{key}": t.detach().to("cpu").contiguous()
               for name, state in states.items() for key, t in state.tensors.items()}
    values = {"format": _FORMAT, "plugins": {name: state.values for name, state in states.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{TRAINING_STATE_FILE}.{os.getpid()}.partial"
    try:
        save_file(tensors, str(partial), metadata={_METADATA_KEY: json.dumps(values)})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_training_state(folder: str | os.PathLike) -> dict[str, TrainingState] | None:
    """The states saved in ``folder`` (``None`` when it has no state file), read as untrusted."""
    from safetensors.torch import load_file

    from .untrusted import parse_json, read_safetensors_header

    path = Path(folder) / TRAINING_STATE_FILE
    if not path.is_file():
        return None
    _, metadata, _ = read_safetensors_header(path)  # bounded, checked header before any tensor is read
    if _METADATA_KEY not in metadata:
        raise StateError(f"{path}: not a modapt training-state file (no '{_METADATA_KEY}' metadata)")
    values = parse_json(metadata[_METADATA_KEY], f"{path} (metadata)")
    plugins = values.get("plugins") if isinstance(values, dict) else None
    if not isinstance(values, dict) or values.get("format") != _FORMAT or not isinstance(plugins, dict):
        raise StateError(f"{path}: training-state format {values.get('format') if isinstance(values, dict) else None!r}"
                         f" is not {_FORMAT}")
    states = {name: TrainingState(name, {}, v if isinstance(v, dict) else {}) for name, v in plugins.items()}
    for key, tensor in load_file(str(path)).items():
        name, _, rest = key.partition("/")
        if name not in states or not rest:
            raise StateError(f"{path}: tensor '{key}' belongs to no plugin listed in the file")
        states[name].tensors[rest] = tensor
    return states


def load_training_state(model: nn.Module, folder: str | os.PathLike, *, registry: Registry | None = None) -> None:
    """Give every plugin back its training state saved in ``folder`` (after the adapter tensors
    were restored). A folder without the file: a warning, and the plugins start afresh; a state
    that no installed plugin takes back: :class:`~modapt.StateError` naming it."""
    states = read_training_state(folder)
    if states is None:
        if training_states(model, registry=registry):
            warnings.warn(f"{folder}: no {TRAINING_STATE_FILE}; plugin training state (AdaLoRA's importance "
                          "scores...) starts afresh", stacklevel=2)
        return
    registry = registry or default_registry()
    with hook_view(model):
        taken = {n for n in registry.call("modapt_load_training_state", model=model, states=states) if n}
    left = sorted(set(states) - taken)
    if left:
        raise StateError(f"{Path(folder) / TRAINING_STATE_FILE}: training state of '{left[0]}', which no installed "
                         "plugin takes back (is its distribution installed and its method in the recipe?)")
