"""AdaLoRA's recipe keys: the SVD update's shape and the rank-budget schedule.

The names and defaults are PEFT 0.21's ``AdaLoraConfig`` ones, except ``dropout`` (PEFT's
``lora_dropout``; the core's LoRA calls it ``dropout``) and ``total_step``, which PEFT also
requires but types as optional.
"""

from __future__ import annotations

import pydantic
from modapt import Options

#: The keys that define one rank budget. Adapter entries that agree on all of them share one
#: budget (one :class:`~modapt_adalora.allocator.RankAllocator`), as PEFT's single config does.
SCHEDULE_KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "total_step",
                 "orth_reg_weight")


class AdaLoraOptions(Options):
    init_r: int = pydantic.Field(12, gt=0, description="initial rank of every adapted layer (the triplets kept at start)")
    target_r: int = pydantic.Field(8, ge=0, description="average rank per layer once the budget has shrunk")
    lora_alpha: float = pydantic.Field(8.0, gt=0, description="scaling numerator: ΔW = P Λ Q · lora_alpha / init_r")
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input (PEFT: lora_dropout)")
    total_step: int = pydantic.Field(gt=0, description="number of optimizer steps the schedule spans (required)")
    tinit: int = pydantic.Field(0, ge=0, description="warm-up steps at the full budget before pruning starts")
    tfinal: int = pydantic.Field(0, ge=0, description="final steps at the target budget with the rank pattern fixed")
    deltaT: int = pydantic.Field(1, gt=0, description="steps between two reallocations while the budget shrinks")
    beta1: float = pydantic.Field(0.85, gt=0.0, lt=1.0, description="EMA coefficient of the sensitivity |θ·∇θ|")
    beta2: float = pydantic.Field(0.85, gt=0.0, lt=1.0, description="EMA coefficient of the uncertainty")
    orth_reg_weight: float = pydantic.Field(0.5, ge=0.0, description="weight of the orthogonality regulariser")

    @pydantic.model_validator(mode="after")
    def _schedule_is_possible(self):
        if self.target_r >= self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be smaller than init_r ({self.init_r}): "
                             "AdaLoRA prunes from init_r down to target_r (use method 'lora' for a fixed rank)")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit ({self.tinit}) must be smaller than total_step - tfinal "
                             f"({self.total_step} - {self.tfinal}): no step would be left to shrink the budget")
        return self

    def schedule_key(self) -> tuple:
        """The values of :data:`SCHEDULE_KEYS` (entries with equal keys share one budget)."""
        return tuple(getattr(self, k) for k in SCHEDULE_KEYS)
