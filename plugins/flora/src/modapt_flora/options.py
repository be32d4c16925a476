"""FLoRA's options, without torch (read by the entry module)."""

from __future__ import annotations

import modapt
import pydantic


class FloraOptions(modapt.Options):
    r: int = pydantic.Field(8, gt=0, description="rank: size of the r×r core G")
    lora_alpha: float = pydantic.Field(8.0, gt=0, description="scaling numerator: s = lora_alpha / r")
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
