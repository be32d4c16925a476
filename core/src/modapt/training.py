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
"""

from __future__ import annotations

import torch
from torch import nn

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
