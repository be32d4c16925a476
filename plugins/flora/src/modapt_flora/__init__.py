"""modapt-flora: the FLoRA update ``ΔW = s · B G A`` (see :mod:`modapt_flora.flora`)."""

from .flora import Flora, FloraOptions

__all__ = ["Flora", "FloraOptions"]
