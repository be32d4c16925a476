"""The stepwise schedule (paper §5.1, Table 3): magnitude (α, β) and direction (ΔW) take turns.

Turn k = ⌊step / period⌋: even turns train the magnitude ``map_alpha``, ``map_beta``; odd
turns train the update's parameters. The paper names (α, β) first and says nothing of the
order or the length of a turn; we start with the magnitude and make the length ``period``.

The resting group's gradients are set to ``None``, not to zero. PyTorch's optimizers skip a
parameter whose ``.grad`` is ``None``: it does not move at all (a zero gradient would still
move it by Adam's momentum and by weight decay) and its Adam moments and step count are
paused, not decayed, until its next turn. Call ``modapt.before_optimizer_step`` before
gradient clipping, so that the clipping norm covers only the group that trains.

The schedule keeps no state between steps: the turn is a function of the step, and the paused
Adam moments are the optimizer's. A resumed run (HF Trainer checkpoint, ``modapt train``)
continues mid-turn from the restored step and optimizer alone, so this plugin gives nothing
to :func:`modapt.training.save_training_state`.
"""

from __future__ import annotations

from torch import nn

import modapt

from .reparam import Map


def resting_group(step: int, period: int) -> str:
    """``"direction"`` when the update rests at ``step`` (a magnitude turn), else ``"magnitude"``."""
    return "direction" if (step // period) % 2 == 0 else "magnitude"


def rest_gradients(model: nn.Module, step: int) -> None:
    """Drop the gradients of the group that rests at ``step`` in every stepwise MAP layer of ``model``."""
    if not modapt.is_adapted(model):
        return
    for host in modapt.state_of(model).layers.values():
        reparam = host.reparam
        if not isinstance(reparam, Map) or reparam.options.schedule != "stepwise":
            continue
        if resting_group(step, reparam.options.period) == "direction":
            names = reparam.update_parameter_names
        else:
            names = reparam.magnitude_parameter_names
        for name in names:
            host.get_parameter(name).grad = None
