"""The recipe keys of ``method = "map"``."""

from __future__ import annotations

from typing import Literal

import pydantic

from modapt import Options


class MapOptions(Options):
    """Hyper-parameters of MAP. The update it wraps is the entry's ``[adapter.update]`` table.

    init: ``"identity"`` (default; β = 0 and the update's all-zero parameters re-initialised
        with N(0, identity_std²), so W* = W0 exactly while every gradient is finite) or
        ``"paper"`` (α = ‖W0‖_F, β = 1, the update as its method initialises it, ΔW/max(‖ΔW‖, eps)).
        The default was chosen by the measurement in the README.
    schedule: ``"joint"`` (default; α, β and the update train together) or ``"stepwise"``
        (paper §5.1: the magnitude (α, β) and the direction (the update) take turns, ``period``
        optimizer steps each, magnitude first), driven by ``modapt.before_optimizer_step``.
    period: optimizer steps per turn of the stepwise schedule.
    eps: floor of ‖ΔW‖_F in ΔW / max(‖ΔW‖_F, eps) (the value of the third-party implementation).
    identity_std: standard deviation of the re-initialised zero parameters under ``init = "identity"``.
    """

    init: Literal["paper", "identity"] = pydantic.Field("identity", description="initialisation of α, β and ΔW")
    schedule: Literal["joint", "stepwise"] = pydantic.Field("joint", description="joint or alternating training")
    period: int = pydantic.Field(1, gt=0, description="optimizer steps per turn of the stepwise schedule")
    eps: float = pydantic.Field(1e-6, gt=0, description="floor of ‖ΔW‖_F in the normalisation")
    identity_std: float = pydantic.Field(1e-3, gt=0, description="std of the re-initialised zero parameters "
                                                                "(init = identity)")
