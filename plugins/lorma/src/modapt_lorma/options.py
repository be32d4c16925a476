"""The recipe keys of ``method = "lorma"``."""

from __future__ import annotations

from typing import Literal

import pydantic
from modapt import Options


class LormaOptions(Options):
    """Hyper-parameters of LoRMA. ``s = lora_alpha / r`` as for LoRA (``lora_alpha = r`` is the paper's form)."""

    r: int = pydantic.Field(8, gt=0, description="rank of B [d, r] and A [r, d]")
    lora_alpha: float = pydantic.Field(8.0, gt=0, description="scaling numerator: s = lora_alpha / r")
    inflation: Literal["plus", "pi", "none"] = pydantic.Field(
        "plus", description="rank inflation: T = I + s·BA (plus), s·Iπ(BA) (pi), s·BA (none)")
    side: Literal["pre", "post"] = pydantic.Field(
        "pre", description="W = T·W0 (pre, T is out×out) or W = W0·T (post, T is in×in)")
    pi_path: Literal["auto", "direct", "fft", "weight"] = pydantic.Field(
        "auto", description="how inflation='pi' applies T = s·Iπ(BA): build T and apply it to W0 x (direct), "
                            "circular correlation (fft), one GEMM with W* = T·W0 replacing the base matmul "
                            "(weight), or the cheapest by a FLOP model per layer and call (auto)")
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of T − I")
    rank_monitor_every: int = pydantic.Field(
        0, ge=0, description="record the numerical rank of T and ΔW every N optimizer steps (0: off)")
