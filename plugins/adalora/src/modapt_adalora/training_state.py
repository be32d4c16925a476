"""AdaLoRA's training state in checkpoints: the importance averages and the current budget.

The rank pattern and the masked Λ are adapter tensors (saved with the adapter). What is not:
per allocator (one per schedule group), the budget after the last allocation and, while the
budget shrinks, the two exponential averages Ī (``sensitivity``) and Ū (``uncertainty``), each
shaped like its parameter (P [out, r], Λ [r, 1], Q [r, in]). Without them a run resumed inside
the allocation phase would restart the averages from zero and prune other triplets than the
uninterrupted run (PEFT does not save them either; its resumed runs differ).

Tensors are named ``<group>.<path>.<lora_A|lora_E|lora_B>.<sensitivity|uncertainty>``; the values
list each group's layer paths, so a checkpoint of another recipe is refused rather than misread.
"""

from __future__ import annotations

from collections.abc import Mapping

from modapt import StateError
from modapt.training import TrainingState
from torch import nn

from .allocator import allocators_of
from .sharding import DTensor

PLUGIN = "adalora"


def training_state(model: nn.Module) -> TrainingState | None:
    """The state of every allocator of ``model``; ``None`` without AdaLoRA layers."""
    allocators = allocators_of(model)
    if not allocators:
        return None
    state = TrainingState(PLUGIN, values={"groups": []})
    for g, allocator in enumerate(allocators):
        scored = bool(allocator.sensitivity)
        if scored and DTensor is not None and any(isinstance(t, DTensor) for t in allocator.sensitivity):
            raise StateError("AdaLoRA's importance scores are FSDP2 shards: saving them in a checkpoint is not "
                             "supported yet (save with the scores gathered, or resume outside the allocation phase)")
        state.values["groups"].append({"layers": list(allocator.hosts), "budget": allocator.budget, "scored": scored})
        if scored:
            for (name, _), s, u in zip(allocator._named_params(), allocator.sensitivity, allocator.uncertainty):
                state.tensors[f"{g}.{name}.sensitivity"] = s
                state.tensors[f"{g}.{name}.uncertainty"] = u
    return state


def load_training_state(model: nn.Module, states: Mapping[str, TrainingState]) -> str | None:
    """Put the saved budget and averages back into ``model``'s allocators (checked first)."""
    saved = states.get(PLUGIN)
    allocators = allocators_of(model)
    if saved is None:
        return None
    groups = saved.values.get("groups")
    if not isinstance(groups, list) or len(groups) != len(allocators):
        raise StateError(f"AdaLoRA training state: {len(groups) if isinstance(groups, list) else 'no'} schedule "
                         f"group(s) saved, the model has {len(allocators)}")
    restored = []
    for g, (entry, allocator) in enumerate(zip(groups, allocators)):
        layers = list(allocator.hosts)
        if not isinstance(entry, dict) or entry.get("layers") != layers:
            raise StateError(f"AdaLoRA training state: group {g} was saved for other layers than the model's "
                             f"({layers[0]}...)")
        budget = entry.get("budget")
        if type(budget) is not int or not 0 <= budget <= allocator.init_budget:
            raise StateError(f"AdaLoRA training state: group {g} has budget {budget!r}, "
                             f"not an integer in 0..{allocator.init_budget}")
        sensitivity, uncertainty = [], []
        if entry.get("scored"):
            for name, param in allocator._named_params():
                pair = [saved.tensors.get(f"{g}.{name}.{kind}") for kind in ("sensitivity", "uncertainty")]
                for kind, t in zip(("sensitivity", "uncertainty"), pair):
                    if t is None or tuple(t.shape) != tuple(param.shape):
                        raise StateError(f"AdaLoRA training state: {kind} of '{name}' is "
                                         f"{'missing' if t is None else list(t.shape)}, the parameter is "
                                         f"{list(param.shape)}")
                sensitivity.append(pair[0].to(device=param.device, dtype=param.dtype))
                uncertainty.append(pair[1].to(device=param.device, dtype=param.dtype))
        restored.append((allocator, budget, sensitivity, uncertainty))
    for allocator, budget, sensitivity, uncertainty in restored:  # all checked: now change the model
        allocator.budget, allocator.sensitivity, allocator.uncertainty = budget, sensitivity, uncertainty
    return PLUGIN
