"""The rank monitor: numerical ranks of T and ΔW (paper App. E.2 / E.3), from a loop or the core hook."""

import modapt
import pytest
import torch
from modapt_lorma import RankMonitor, rank_report
from torch import nn


class Square(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.proj = nn.Linear(d, d)
        with torch.no_grad():  # a full-rank W0, so rank(ΔW) = rank(T − I)
            self.proj.weight.copy_(torch.eye(d) + 0.1 * torch.randn(d, d))

    def forward(self, x):
        return self.proj(x)


def adapted(registry, inflation, **options):
    torch.manual_seed(0)
    entry = {"method": "lorma", "targets": ["proj"], "r": 4, "inflation": inflation, **options}
    return modapt.apply(Square(), {"adapter": [entry]}, registry=registry)


@torch.no_grad()
def train_like(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for p in modapt.trainable_parameters(model).values():
        p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("inflation,rank_t,rank_delta", [
    ("plus", 32, 4),    # I + s·BA keeps (almost) full rank; ΔW = s·BA·W0 has rank ≤ r (Table 15: 8 for r = 8)
    ("pi", 32, 32),     # Iπ inflates: T and ΔW (almost) full rank (Table 15: 1021 of 1024)
    ("none", 4, 32),    # T = s·BA has rank r; ΔW = (T − I)W0 is full rank but T collapsed
])
def test_rank_report_after_training(registry, inflation, rank_t, rank_delta):
    model = adapted(registry, inflation)
    train_like(model)
    report = rank_report(model)
    assert set(report) == {"proj"}
    ranks = report["proj"]
    assert (ranks["rank_T"], ranks["rank_delta"], ranks["d"]) == (rank_t, rank_delta, 32)
    # independently: SVD of the explicit matrices
    host = model.proj
    t = host.update.transform().detach()
    assert int((torch.linalg.svdvals(t) > 1e-4 * torch.linalg.svdvals(t)[0]).sum()) == rank_t


def test_rank_at_init(registry):
    ranks = rank_report(adapted(registry, "plus"))["proj"]
    assert ranks["rank_T"] == 32 and ranks["rank_delta"] == 0


def test_monitor_every_n_steps(registry):
    model = adapted(registry, "pi")
    monitor = RankMonitor(every=2, log=False)
    for step in range(5):
        monitor(model, step)
    assert [s for s, _ in monitor.history] == [0, 2, 4]


def test_recipe_key_records_through_the_core_hook(registry):
    model = adapted(registry, "pi", rank_monitor_every=3)
    for step in range(7):
        modapt.after_optimizer_step(model, step, registry=registry)
    history = model.proj.update.rank_history
    assert [s for s, _ in history] == [0, 3, 6]
    assert history[0][1]["rank_T"] == 32


def test_trainer_callback(registry):
    from types import SimpleNamespace

    model = adapted(registry, "plus")
    monitor = RankMonitor(every=1, log=False)
    callback = monitor.trainer_callback()
    callback.on_step_end(None, SimpleNamespace(global_step=4), None, model=model)
    assert monitor.history[0][0] == 4


def test_no_lorma_layers_gives_empty_report(registry):
    model = modapt.apply(Square(), {"adapter": [{"method": "lora", "targets": ["proj"]}]}, registry=registry)
    assert rank_report(model) == {}
    assert rank_report(Square()) == {}
