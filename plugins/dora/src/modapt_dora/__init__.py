"""modapt-dora: the DoRA reparam ``W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row`` (see :mod:`modapt_dora.dora`)."""

from .dora import Dora, DoraOptions
from .norm import direct_row_norm, factored_row_norm

__all__ = ["Dora", "DoraOptions", "direct_row_norm", "factored_row_norm"]
