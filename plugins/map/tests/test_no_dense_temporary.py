"""A LoMAP training step over LoRA allocates nothing of the size of ΔW (out × in).

Every aten op that runs in the step (forward, backward, AdamW step) is recorded with a
``TorchDispatchMode``; an op that is not a view and returns a tensor with out·in elements or
more would be a materialised ΔW (or W*). The sizes are chosen so that no activation is that
large. The same detector catches the fallback path (an update without a closed-form norm),
so the test can fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import modapt
from modapt.lora import Lora

OUT, IN, TOKENS = 48, 40, 15  # the largest activation is TOKENS·OUT = 720 < OUT·IN = 1920


class LargeAllocations(TorchDispatchMode):
    """Records (op, shape) of every non-view output with at least ``limit`` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                    self.seen.append((str(func), tuple(t.shape)))
        return out


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(IN, OUT)
        self.down = nn.Linear(OUT, IN)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class NoClosedForm(Lora):
    """LoRA without its closed-form norm: MAP has to build ΔW to take its norm (the fallback)."""

    def frobenius_sq(self, w0):
        return None


class NoClosedFormPlugin:
    @staticmethod
    @modapt.hookimpl
    def modapt_register_methods(register):
        from dataclasses import replace

        from modapt.lora import LORA

        register(replace(LORA, name="lora_no_norm", build=NoClosedForm))


def training_step_allocations(registry, update: str, init: str) -> list:
    model = TwoLayers()
    recipe = {"adapter": [{"method": "map", "targets": ["up", "down"], "init": init,
                           "update": {"method": update, "r": 4}}]}
    modapt.apply(model, recipe, registry=registry)
    opt = torch.optim.AdamW(modapt.trainable_parameters(model).values(), lr=1e-3, foreach=False)
    x = torch.randn(3, 5, IN)
    model.train()
    for step in range(2):  # the second step has Adam state and a non-zero B under either init
        with LargeAllocations(OUT * IN) as mode:
            model(x).pow(2).mean().backward()
            modapt.before_optimizer_step(model, step, registry=registry)
            opt.step()
            opt.zero_grad()
    return mode.seen


@pytest.mark.parametrize("init", ["identity", "paper"])
def test_lomap_step_builds_no_out_by_in_tensor(registry, init):
    assert training_step_allocations(registry, "lora", init) == []


def test_the_detector_sees_the_materialising_fallback(registry):
    registry.register_plugin(NoClosedFormPlugin, name="lora_no_norm")
    seen = training_step_allocations(registry, "lora_no_norm", "identity")
    assert any(shape in ((OUT, IN), (IN, OUT)) for _, shape in seen), seen
