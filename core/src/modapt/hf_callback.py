"""Hugging Face ``Trainer`` integration: the same hooks as ``modapt train``'s loop.

``ModaptCallback`` calls :func:`modapt.before_optimizer_step` / :func:`modapt.after_optimizer_step`
around each optimizer step; ``ModaptTrainer`` also adds :func:`modapt.regularization_loss`
to the loss (a callback cannot change the loss)::

    trainer = ModaptTrainer(model=model, args=args, train_dataset=...)   # callback included
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from .training import after_optimizer_step, before_optimizer_step, regularization_loss


class ModaptCallback(TrainerCallback):
    """Runs the plugins' optimizer-step hooks (AdaLoRA's allocation, MAP's schedule)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        before_optimizer_step(model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        after_optimizer_step(model, state.global_step)


class ModaptTrainer(Trainer):
    """A ``Trainer`` that adds the plugins' regularisation terms and runs their step hooks."""

    def __init__(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, ModaptCallback) for c in callbacks):
            callbacks.append(ModaptCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + regularization_loss(model).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss
