"""DoRA's options and parameter name, without torch (read by the entry module)."""

from __future__ import annotations

from modapt import Options

MAGNITUDE = "lora_magnitude_vector"


class DoraOptions(Options):
    """DoRA has no hyper-parameters of its own: rank, alpha and dropout belong to the update
    (``[adapter.update]``, LoRA's ``r``, ``lora_alpha``, ``dropout``)."""
