"""QuanTA's options, without torch (read by the entry module)."""

from __future__ import annotations

from typing import Annotated, Literal

import modapt
import pydantic


class QuantaOptions(modapt.Options):
    dims: list[Annotated[int, pydantic.Field(ge=2)]] | None = pydantic.Field(
        None, min_length=2,
        description="factors d1…dN of the hidden size, e.g. [16, 8, 8, 4] for 4096; a layer side of "
                    "another size is factored automatically into as many axes")
    num_axes: int | None = pydantic.Field(
        None, ge=2, description="N for the automatic factorisation (default 4, or len(dims))")
    dropout: float = pydantic.Field(
        0.0, ge=0.0, lt=1.0,
        description="dropout on the input of the trainable circuit T(θ) only (the official placement)")
    init: Literal["kaiming", "orthogonal"] = pydantic.Field(
        "kaiming", description="gate initialisation: 'kaiming' (official: Kaiming-uniform, linear gain) "
                               "or 'orthogonal' (each gate a (semi-)orthogonal matrix)")

    @pydantic.model_validator(mode="after")
    def _axes_agree(self):
        if self.dims is not None and self.num_axes is not None and self.num_axes != len(self.dims):
            raise ValueError(f"num_axes = {self.num_axes} but dims {self.dims} has {len(self.dims)} axes; "
                             "give one of them")
        return self
