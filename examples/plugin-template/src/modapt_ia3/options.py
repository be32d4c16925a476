"""IA3's options, without torch: the entry module reads them when the registry loads."""

from __future__ import annotations

import pydantic

import modapt


class Ia3Options(modapt.Options):
    side: str = pydantic.Field("output", pattern="^(output|input)$",
                               description="rescale the output channels or the input features")
