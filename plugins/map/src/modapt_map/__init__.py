"""MAP (Si et al., 2025) for modapt: a weight is a vector; W* = α·W0/‖W0‖_F + β·ΔW/‖ΔW‖_F.

``method = "map"`` is a reparam: it wraps any update (LoRA gives LoMAP). The plugin module
registered through the entry point is :mod:`modapt_map.plugin`.
"""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_map.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {"Map": "reparam", "MapOptions": "options"})

__all__ = ["Map", "MapOptions"]
