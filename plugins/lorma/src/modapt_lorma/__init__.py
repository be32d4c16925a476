"""LoRMA for modapt: low-rank multiplicative adaptation (Bihany, Patel, Modi, 2025).

The method ``lorma`` (family ``update``) adapts a weight W0 [out, in] multiplicatively,
``W = T · W0`` (``side = "pre"``, T is out×out) or ``W = W0 · T`` (``side = "post"``, T is
in×in), with T = I + s·BA (``inflation = "plus"``), s·Iπ(BA) (``"pi"``) or s·BA (``"none"``).
As an update it produces ΔW = (T − I)·W0 or W0·(T − I). See the README for the equations.
"""

from .inflation import pi_apply_direct, pi_apply_fft, rotate_rows
from .options import LormaOptions
from .rank_monitor import RankMonitor, rank_report
from .update import Lorma
from .weight_path import pi_weight_linear

__all__ = ["Lorma", "LormaOptions", "RankMonitor", "pi_apply_direct", "pi_apply_fft", "pi_weight_linear",
           "rank_report", "rotate_rows"]
