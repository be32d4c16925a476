"""AdaLoMAP: MAP (modapt-map) over AdaLoRA, only through the update contract.

Trains 20 steps on a tiny LLaMA with the rank schedule running, then saves, reloads and merges.
Skipped when modapt-map is not installed.
"""

from __future__ import annotations

import modapt
import modapt.lora
import modapt_adalora
import modapt_adalora.plugin
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama

map_plugin = pytest.importorskip("modapt_map.plugin")

RECIPE = {"adapter": [{"method": "map", "targets": ["q_proj", "v_proj", "down_proj"],
                       "update": {"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 20,
                                  "tinit": 3, "tfinal": 5, "deltaT": 2, "lora_alpha": 8.0}}]}


@pytest.fixture
def both(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_adalora.plugin, name="adalora", distribution="modapt-adalora")
    modapt_registry.register_plugin(map_plugin, name="map", distribution="modapt-map")
    return modapt_registry


def test_adalomap_trains_saves_reloads_and_merges(both, tmp_path):
    model = modapt.apply(tiny_llama(), RECIPE, registry=both)
    hosts = modapt_adalora.allocator.adalora_layers(model)
    assert len(hosts) == 6 and all(h.reparam.method_name == "map" for h in hosts.values())
    inputs = tiny_inputs()
    opt = torch.optim.AdamW(modapt.trainable_parameters(model).values(), lr=5e-3)
    model.train()
    losses = []
    for step in range(21):   # steps 0..20: the final allocation is at step total_step - tfinal = 15
        task = model(**inputs, labels=inputs["input_ids"]).loss
        (task + modapt.regularization_loss(model, registry=both)).backward()
        modapt.before_optimizer_step(model, step, registry=both)
        opt.step()
        modapt.after_optimizer_step(model, step, registry=both)
        opt.zero_grad()
        losses.append(task.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] and sum(losses[-5:]) < sum(losses[:5]), losses
    assert sum(modapt_adalora.ranks(model).values()) == 2 * 6
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    modapt.save(model, tmp_path / "adalomap", registry=both)
    fresh = modapt.load(tiny_llama(), tmp_path / "adalomap", registry=both)
    assert modapt_adalora.ranks(fresh) == modapt_adalora.ranks(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, atol=0, rtol=0)
        modapt.merge(fresh)
        torch.testing.assert_close(fresh(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        modapt.merge(model)
    merged, reloaded = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(merged[k], reloaded[k]) for k in merged)
