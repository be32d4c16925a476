"""modapt-quanta: the QuanTA update ``ΔW = T(θ) − T(θ0)`` (see :mod:`modapt_quanta.quanta`)."""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_quanta.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {
    "Circuit": "circuit", "apply_circuit": "circuit", "plan_circuit": "circuit", "factorize": "factorization",
    "Quanta": "quanta", "QuantaOptions": "options"})

__all__ = ["Circuit", "Quanta", "QuantaOptions", "apply_circuit", "factorize", "plan_circuit"]
