"""Fixtures: a registry with the composers plugin and every installed method plugin of this repository,
and a 20-step training loop on a tiny LLaMA with a learnable target (it memorises a fixed batch)."""

from __future__ import annotations

import importlib.metadata

import modapt
import modapt.lora
import modapt_composers.plugin
import pytest
import torch
from modapt.testing import tiny_inputs

def installed_plugins() -> dict[str, object]:
    """Every installed modapt plugin but the composers, found by its entry point (no list of names)."""
    found = {}
    for ep in importlib.metadata.entry_points(group="modapt"):
        if ep.name == "composers":
            continue
        try:
            found[ep.name] = ep.load()
        except ImportError:
            continue
    return found


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    for name, module in installed_plugins().items():
        modapt_registry.register_plugin(module, name, f"modapt-{name}")
    modapt_registry.register_plugin(modapt_composers.plugin, "composers", "modapt-composers")
    return modapt_registry


def need(registry, *methods):
    """Skip when a method plugin the test needs is not installed."""
    missing = [m for m in methods if m not in registry.methods]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def lm_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["input_ids"]).loss


def train(model, steps: int = 20, lr: float = 1e-2) -> tuple[float, float]:
    """(loss before, loss after) in eval mode; the loop calls every training hook as a user's loop would."""
    batch = tiny_inputs(batch=2, seq=8, padded=False)
    model.eval()
    with torch.no_grad():
        before = lm_loss(model, batch).item()
    model.train()
    params = list(modapt.trainable_parameters(model).values())
    optimizer = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        loss = lm_loss(model, batch) + modapt.regularization_loss(model)
        loss.backward()
        modapt.before_optimizer_step(model, step)
        optimizer.step()
        modapt.after_optimizer_step(model, step)
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        after = lm_loss(model, batch).item()
    return before, after


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class Helpers:
    need = staticmethod(need)
    train = staticmethod(train)
    logits = staticmethod(logits)


@pytest.fixture
def helpers():
    return Helpers


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads oversubscribe
    (measured: 20 steps took 86 s on 2 threads, 3.9 s on 1). Restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
