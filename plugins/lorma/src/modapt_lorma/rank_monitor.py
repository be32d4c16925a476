"""Numerical rank of T and ΔW for every LoRMA layer (paper App. E.2, Fig. 7 and E.3, Table 15).

Use it from any training loop::

    monitor = RankMonitor(every=100)
    ...
    optimizer.step()
    monitor(model, step)            # records monitor.history[-1] every 100 steps

from a Hugging Face ``Trainer`` (``callbacks=[monitor.trainer_callback()]``), or without
code through the recipe key ``rank_monitor_every = N``: the plugin's
``modapt_after_optimizer_step`` hook then appends ``(step, ranks)`` to each layer's
``host.update.rank_history`` and logs it (logger ``modapt_lorma``).

Ranks are ``torch.linalg.matrix_rank`` of float32 matrices (an SVD: O(d³) for T, so call
it every few hundred steps on large models, not every step).
"""

from __future__ import annotations

import logging
from typing import Any

import modapt
import torch
from torch import nn

logger = logging.getLogger("modapt_lorma")


@torch.no_grad()
def layer_ranks(update, *, rtol: float | None = None) -> dict[str, Any]:
    """``{"d", "rank_T", "rank_delta", "delta_shape", "inflation", "side"}`` for one LoRMA update.

    ``rtol`` as in :func:`torch.linalg.matrix_rank` (default: σ_max · max(m, n) · eps).
    """
    t = update.transform().float()
    w0 = update._w0().float()
    delta = update.delta_weight(w0)
    return {
        "d": update.d,
        "rank_T": int(torch.linalg.matrix_rank(t, rtol=rtol)),
        "rank_delta": int(torch.linalg.matrix_rank(delta, rtol=rtol)),
        "delta_shape": tuple(delta.shape),
        "inflation": update.options.inflation,
        "side": update.options.side,
    }


def lorma_layers(model: nn.Module):
    """(path, update) for every layer of ``model`` whose update is LoRMA (any reparam around it)."""
    from .update import Lorma

    if not modapt.is_adapted(model):
        return
    for path, host in modapt.state_of(model).layers.items():
        if isinstance(host.update, Lorma):
            yield path, host.update


def rank_report(model: nn.Module, *, rtol: float | None = None) -> dict[str, dict[str, Any]]:
    """``{layer path: layer_ranks(...)}`` for every LoRMA layer of ``model`` (empty if none)."""
    return {path: layer_ranks(update, rtol=rtol) for path, update in lorma_layers(model)}


class RankMonitor:
    """Calls :func:`rank_report` every ``every`` steps and keeps ``history``: [(step, report)]."""

    def __init__(self, every: int = 1, *, rtol: float | None = None, log: bool = True):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.rtol, self.log = every, rtol, log
        self.history: list[tuple[int, dict[str, dict[str, Any]]]] = []

    def __call__(self, model: nn.Module, step: int) -> dict[str, dict[str, Any]] | None:
        if step % self.every:
            return None
        report = rank_report(model, rtol=self.rtol)
        self.history.append((step, report))
        if self.log:
            for path, ranks in report.items():
                logger.info("step %d %s: rank(T) = %d / %d, rank(ΔW) = %d", step, path, ranks["rank_T"],
                            ranks["d"], ranks["rank_delta"])
        return report

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` calling this monitor at the end of each step."""
        from transformers import TrainerCallback

        monitor = self

        class _RankMonitorCallback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if model is not None:
                    monitor(model, state.global_step)

        return _RankMonitorCallback()


def record_from_hook(model: nn.Module, step: int) -> None:
    """What ``modapt_after_optimizer_step`` does: layers with ``rank_monitor_every`` record their ranks."""
    for path, update in lorma_layers(model):
        every = update.options.rank_monitor_every
        if every and step % every == 0:
            ranks = layer_ranks(update)
            update.rank_history.append((step, ranks))
            logger.info("step %d %s: rank(T) = %d / %d, rank(ΔW) = %d", step, path, ranks["rank_T"], ranks["d"],
                        ranks["rank_delta"])
