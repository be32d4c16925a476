"""Hugging Face ``Trainer`` integration: the same hooks as ``modapt train``'s loop.

``ModaptCallback`` calls :func:`modapt.before_optimizer_step` / :func:`modapt.after_optimizer_step`
around each optimizer step. A callback can change neither the loss nor what a checkpoint holds,
so :class:`ModaptTrainerMixin` does the rest, for ``Trainer`` and any subclass of it (TRL's
``SFTTrainer``, ``DPOTrainer``...):

- the loss gets :func:`modapt.regularization_loss` (AdaLoRA's orthogonality term);
- ``save_model()`` and every ``checkpoint-N/`` hold a modapt adapter folder (:func:`modapt.save`:
  the adapter alone, replaced atomically), never the whole model; the Trainer's own files
  (optimizer, scheduler, RNG, ``trainer_state.json``, ``training_args.bin``) sit beside it;
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` read the adapter tensors back into
  the adapted model (:func:`modapt.persistence.restore`)::

    trainer = ModaptTrainer(model=model, args=args, train_dataset=...)   # callback included
    SFT = with_modapt(trl.SFTTrainer)                                    # the same for any Trainer
    trainer = SFT(model=model, args=sft_args, train_dataset=...)

Each checkpoint also holds the plugins' training state kept outside the adapter tensors
(:func:`modapt.save_training_state`: AdaLoRA's importance averages and budget), given back on
resume, so a resumed run ends where the uninterrupted one ends; MAP's stepwise schedule follows
from the step number, which the Trainer restores.

``ModaptCallback`` alone (in a plain ``Trainer`` or TRL's, without the mixin) runs the step
hooks and, in ``on_save``, turns each ``checkpoint-N/`` the Trainer just wrote into an adapter
folder: the adapter is saved into it (atomically), then the Trainer's whole-model weight files
are deleted, then the plugins' training state is added; the folder loads with ``modapt.load``
at every moment (a crash in between leaves extra files, never a broken adapter). Resuming needs
the mixin (:func:`with_modapt`): a plain Trainer loads a checkpoint before any callback runs and
looks for whole-model weights. A callback cannot add the regularisation term to the loss either.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .apply import is_adapted
from .persistence import restore, save
from .training import (TRAINING_STATE_FILE, after_optimizer_step, before_optimizer_step, load_training_state,
                       regularization_loss, save_training_state)

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the pickled TrainingArguments


#: the whole-model weight files a Trainer writes into a checkpoint (single file or shards + index)
FULL_MODEL_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


class ModaptCallback(TrainerCallback):
    """Runs the plugins' optimizer-step hooks (AdaLoRA's allocation, MAP's schedule) and makes
    each ``checkpoint-N/`` of a Trainer without the mixin an adapter folder (see the module)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        before_optimizer_step(_unwrapped(model), state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        after_optimizer_step(_unwrapped(model), state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        model = _unwrapped(model)
        if model is None or not is_adapted(model) or not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # a checkpoint under another name (hyper-parameter search): left as is
            return
        full = [p for p in folder.iterdir() if FULL_MODEL_FILES.fullmatch(p.name)]
        if full:  # a Trainer without the mixin saved the whole model: the adapter replaces it
            save(model, folder)
            for path in full:  # only once the adapter is in place: the folder loads at every moment
                path.unlink()
        if not (folder / TRAINING_STATE_FILE).is_file():
            save_training_state(model, folder)


def _unwrapped(model):
    """The adapted model inside a DDP/FSDP wrapper (``.module``), or ``model``."""
    while model is not None and not is_adapted(model) and hasattr(model, "module"):
        model = model.module
    return model


class ModaptTrainerMixin:
    """Put before a ``Trainer`` class in the bases (or use :func:`with_modapt`): adapter
    checkpoints, resume, the regularisation loss and :class:`ModaptCallback` (see the module)."""

    def __init__(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, ModaptCallback) for c in callbacks):
            callbacks.append(ModaptCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + regularization_loss(self._adapted()).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _adapted(self):
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapted()
        if not is_adapted(model):  # a plain model: the Trainer's own full save
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        save(model, output_dir)  # the adapter alone; files already in the folder are kept
        save_training_state(model, output_dir)  # the plugins' state outside the tensors
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self._adapted() if model is None else model
        if not is_adapted(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        restore(target, resume_from_checkpoint)
        load_training_state(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        model = self._adapted()
        if not is_adapted(model):
            return super()._load_best_model()
        restore(model, self.state.best_model_checkpoint)
        return None


def with_modapt(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` with :class:`ModaptTrainerMixin` in front (e.g. ``with_modapt(trl.SFTTrainer)``)."""
    return type(f"Modapt{trainer_class.__name__}", (ModaptTrainerMixin, trainer_class), {})


class ModaptTrainer(ModaptTrainerMixin, Trainer):
    """``Trainer`` with modapt's loss term, step hooks and adapter-folder checkpoints."""
