"""modapt-quanta: the QuanTA update ``ΔW = T(θ) − T(θ0)`` (see :mod:`modapt_quanta.quanta`)."""

from .circuit import Circuit, apply_circuit, plan_circuit
from .factorization import factorize
from .quanta import Quanta, QuantaOptions

__all__ = ["Circuit", "Quanta", "QuantaOptions", "apply_circuit", "factorize", "plan_circuit"]
