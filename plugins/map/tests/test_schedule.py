"""The stepwise schedule: (α, β) and the update take turns; the resting group does not move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modapt
from modapt_map.schedule import resting_group

IN, OUT = 12, 10
MAGNITUDE = ("layer.map_alpha", "layer.map_beta")
DIRECTION = ("layer.lora_A.weight", "layer.lora_B.weight")


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.layer(x)


def train(registry, steps: int, **options):
    """Run ``steps`` AdamW steps (weight decay on); return the parameters after each step and the optimizer."""
    model = modapt.apply(Holder(), {"adapter": [{"method": "map", "targets": ["layer"], **options,
                                                 "update": {"method": "lora", "r": 2}}]}, registry=registry)
    params = modapt.trainable_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(1))
    history = [{n: p.detach().clone() for n, p in params.items()}]
    for step in range(steps):
        (model(x) - 1.0).pow(2).mean().backward()
        modapt.before_optimizer_step(model, step, registry=registry)
        opt.step()
        opt.zero_grad()
        history.append({n: p.detach().clone() for n, p in params.items()})
    return params, history, opt


def moved(history, step, names):
    return [not torch.equal(history[step][n], history[step + 1][n]) for n in names]


def test_resting_group_alternates_by_period():
    assert [resting_group(s, 1) for s in range(4)] == ["direction", "magnitude", "direction", "magnitude"]
    assert [resting_group(s, 2) for s in range(4)] == ["direction", "direction", "magnitude", "magnitude"]


@pytest.mark.parametrize("period", [1, 2])
def test_stepwise_moves_one_group_per_step(registry, period):
    _, history, _ = train(registry, 4 * period, schedule="stepwise", period=period)
    for step in range(4 * period):
        magnitude_turn = (step // period) % 2 == 0
        assert all(moved(history, step, MAGNITUDE)) == magnitude_turn, step
        # at step 0 the update's gradient is 0 anyway (β = 0); it rests all the same
        assert not any(moved(history, step, DIRECTION)) or not magnitude_turn, step
        if not magnitude_turn:
            assert all(moved(history, step, DIRECTION)), step


def test_stepwise_pauses_adam_state_of_the_resting_group(registry):
    params, _, opt = train(registry, 3, schedule="stepwise")
    # steps 0 and 2 train the magnitude, step 1 the direction: each group's Adam clock
    # counts only its own turns (no decay of moments, no weight decay while resting)
    assert float(opt.state[params["layer.map_alpha"]]["step"]) == 2
    assert float(opt.state[params["layer.lora_B.weight"]]["step"]) == 1


def test_joint_moves_everything(registry):
    _, history, _ = train(registry, 2, schedule="joint")
    assert all(moved(history, 1, MAGNITUDE + DIRECTION))


def test_the_hook_ignores_models_without_adapters(registry):
    modapt.before_optimizer_step(Holder(), 0, registry=registry)
