"""modapt-dora: the DoRA reparam ``W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row`` (see :mod:`modapt_dora.dora`)."""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_dora.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {"Dora": "dora", "DoraOptions": "options",
                                               "direct_row_norm": "norm", "factored_row_norm": "norm"})

__all__ = ["Dora", "DoraOptions", "direct_row_norm", "factored_row_norm"]
