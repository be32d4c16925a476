"""modapt-adalora: AdaLoRA (Zhang et al., 2023) as a modapt update, with PEFT 0.21's numerics.

The method ``adalora`` registers through :mod:`modapt_adalora.plugin` (entry point ``adalora``).
"""

from __future__ import annotations

from modapt import lazy_exports

# imported on first use: the entry module (modapt_adalora.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {
    "RankAllocator": "allocator", "allocators_of": "allocator", "budget_schedule": "allocator", "ranks": "allocator",
    "AdaLoraOptions": "options", "orthogonality": "orthogonality", "AdaLora": "svd_update"})

__all__ = ["AdaLora", "AdaLoraOptions", "RankAllocator", "allocators_of", "budget_schedule", "orthogonality", "ranks"]
