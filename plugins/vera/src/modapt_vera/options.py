"""VeRA's options, without torch (read by the entry module)."""

from __future__ import annotations

import modapt
import pydantic


class VeraOptions(modapt.Options):
    r: int = pydantic.Field(256, gt=0, description="rank: rows of the shared A, columns of the shared B")
    projection_prng_key: int = pydantic.Field(0, ge=0, description="seed of the shared random A and B")
    d_initial: float = pydantic.Field(0.1, description="initial value of every entry of vera_lambda_d")
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    save_projection: bool = pydantic.Field(
        False, description="PEFT's field: PEFT folders written for this adapter store the shared A and B "
                           "(checked against the regenerated ones when read); modapt's own files never do")
