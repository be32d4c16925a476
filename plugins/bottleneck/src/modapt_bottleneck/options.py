"""The bottleneck method's options, without torch (read by the entry module)."""

from __future__ import annotations

from typing import Literal

import modapt
import pydantic

DEFAULT_R = 16
#: the non-linearities :data:`modapt_bottleneck.adapter.ACTIVATIONS` maps to modules (same keys)
ACTIVATION_NAMES = ("relu", "gelu", "silu", "swish", "tanh", "identity")


class BottleneckOptions(modapt.Options):
    placement: Literal["series", "parallel", "ffn", "pfeiffer"] = pydantic.Field(
        "series", description="series (Houlsby), parallel (He et al.), ffn (Adapter-FFN: parallel, FFN only) "
                              "or pfeiffer (AdapterHub's SeqBn: FFN only, after the residual addition)")
    input: Literal["sublayer", "residual"] | None = pydantic.Field(
        None, description="parallel and ffn only: what the adapter reads, the sub-block's input ('sublayer', "
                          "default: He et al., LLM-Adapters) or the residual stream ('residual': AdapterHub)")
    r: int | None = pydantic.Field(
        None, gt=0, description="bottleneck size (the down-projection's output dimension); default 16")
    reduction_factor: float | None = pydantic.Field(
        None, gt=0, description="alternative to r, as AdapterHub: r = hidden size // reduction_factor (at least 1)")
    activation: Literal[ACTIVATION_NAMES] = pydantic.Field("relu", description="non-linearity inside the bottleneck")
    scale: float | None = pydantic.Field(
        None, description="factor on the adapter's output; default 1 (series, parallel) or 4 (ffn)")
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout after the non-linearity")

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        if self.r is not None and self.reduction_factor is not None:
            raise ValueError(f"r = {self.r} and reduction_factor = {self.reduction_factor} both given; give one")
        if self.input is not None and self.placement not in ("parallel", "ffn"):
            raise ValueError(f"input applies to the parallel and ffn placements, not placement = "
                             f"{self.placement!r}")
        return self

    def size(self, d: int) -> int:
        """The bottleneck size for hidden size ``d``: ``r``, else ``d // reduction_factor`` (≥ 1), else 16."""
        if self.r is not None:
            return self.r
        if self.reduction_factor is not None:
            return max(1, int(d // self.reduction_factor))
        return DEFAULT_R
