"""modapt-vera: the ``vera`` update method (Vector-based Random Matrix Adaptation)."""

from .vera import Vera, VeraOptions, VeraProjection

__all__ = ["Vera", "VeraOptions", "VeraProjection"]
