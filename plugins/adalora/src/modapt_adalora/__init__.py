"""modapt-adalora: AdaLoRA (Zhang et al., 2023) as a modapt update, with PEFT 0.21's numerics.

The method ``adalora`` registers through :mod:`modapt_adalora.plugin` (entry point ``adalora``).
"""

from __future__ import annotations

from .allocator import RankAllocator, allocators_of, budget_schedule, ranks
from .options import AdaLoraOptions
from .orthogonality import orthogonality
from .svd_update import AdaLora

__all__ = ["AdaLora", "AdaLoraOptions", "RankAllocator", "allocators_of", "budget_schedule", "orthogonality", "ranks"]
