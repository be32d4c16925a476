"""modapt-flora: the FLoRA update ``ΔW = s · B G A`` (see :mod:`modapt_flora.flora`)."""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_flora.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {"Flora": "flora", "FloraOptions": "options"})

__all__ = ["Flora", "FloraOptions"]
