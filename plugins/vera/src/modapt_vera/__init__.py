"""modapt-vera: the ``vera`` update method (Vector-based Random Matrix Adaptation)."""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_vera.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {"Vera": "vera", "VeraOptions": "options", "VeraProjection": "vera"})

__all__ = ["Vera", "VeraOptions", "VeraProjection"]
