"""modapt-composers: the papers' compositions as named presets, and the rules of composition.

Presets (:mod:`modapt_composers.presets`) are recipe data naming methods as strings; the rules
(:mod:`modapt_composers.rules`) read each method's family and capabilities from the registry.
Neither imports a method plugin.
"""

from .presets import PRESETS, PresetSpec
from .rules import check_recipe

__all__ = ["PRESETS", "PresetSpec", "check_recipe"]
