"""LoRMA for modapt: low-rank multiplicative adaptation (Bihany, Patel, Modi, 2025).

The method ``lorma`` (family ``update``) adapts a weight W0 [out, in] multiplicatively,
``W = T · W0`` (``side = "pre"``, T is out×out) or ``W = W0 · T`` (``side = "post"``, T is
in×in), with T = I + s·BA (``inflation = "plus"``), s·Iπ(BA) (``"pi"``) or s·BA (``"none"``).
As an update it produces ΔW = (T − I)·W0 or W0·(T − I). See the README for the equations.
"""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_lorma.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {
    "pi_apply_direct": "inflation", "pi_apply_fft": "inflation", "rotate_rows": "inflation",
    "LormaOptions": "options", "RankMonitor": "rank_monitor", "rank_report": "rank_monitor", "Lorma": "update",
    "pi_weight_linear": "weight_path"})

__all__ = ["Lorma", "LormaOptions", "RankMonitor", "pi_apply_direct", "pi_apply_fft", "pi_weight_linear",
           "rank_report", "rotate_rows"]
