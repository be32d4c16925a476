"""Load an adapter folder onto a live model: a modapt folder (``modapt.save``) or a PEFT one.

``modapt.load`` reads modapt folders; a PEFT folder (``peft_type`` in ``adapter_config.json``) goes
through :func:`modapt_export.peft_format.load_peft`, the reader ``modapt merge`` uses (PEFT's keys
and options converted to a modapt recipe and tensors, shapes checked, nothing changed on error).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

import modapt


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a PEFT adapter config (``peft_type`` in ``adapter_config.json``)."""
    import json

    from modapt import persistence

    path = Path(directory) / persistence.CONFIG_NAME
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and "peft_type" in raw


def load_adapter_folder(model: nn.Module, directory: str | os.PathLike,
                        registry: modapt.Registry | None = None) -> nn.Module:
    """Apply the adapter in ``directory`` (modapt or PEFT) to ``model`` and load its tensors;
    returns ``model``. A failure leaves the model as it was."""
    if not is_peft_folder(directory):
        return modapt.load(model, str(directory), registry=registry)
    from .peft_format import load_peft  # what ``modapt merge`` and ``load_peft`` read

    with torch.no_grad():
        return load_peft(model, directory, registry=registry)
