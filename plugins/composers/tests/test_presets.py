"""Every preset trains on a tiny LLaMA, saves, reloads bit-exactly and merges."""

from __future__ import annotations

import modapt
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama
from modapt_composers.presets import PRESETS, methods_of

# the tiny model's run is 20 steps: AdaLoRA's schedule must fit in it
OVERRIDES = {"adalomap": {"adalora": {"total_step": 20, "tinit": 5, "tfinal": 5}}}


def preset_recipe(name: str) -> dict:
    recipe = {"preset": name}
    if name in OVERRIDES:
        recipe["overrides"] = OVERRIDES[name]
    return recipe


@pytest.mark.parametrize("name", [p.name for p in PRESETS])
def test_preset_trains_saves_reloads_and_merges(name, registry, helpers, tmp_path):
    preset = next(p for p in PRESETS if p.name == name)
    helpers.need(registry, *methods_of(preset.recipe))
    model = modapt.apply(tiny_llama(seed=0), preset_recipe(name), registry=registry)
    before, after = helpers.train(model)
    assert after < before - 0.05, f"{name}: loss {before:.4f} -> {after:.4f} did not decrease"

    modapt.save(model, tmp_path / "adapter", registry=registry)
    fresh = modapt.load(tiny_llama(seed=0), tmp_path / "adapter", registry=registry)
    saved, loaded = modapt.adapter_state_dict(model), modapt.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and saved
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), f"{key} differs after save/load"
    batch = tiny_inputs()
    fresh.eval()
    expected = helpers.logits(model, batch)
    assert torch.equal(helpers.logits(fresh, batch), expected)

    weights = {k: p.detach().clone() for k, p in fresh.named_parameters() if k.endswith("base_layer.weight")}
    modapt.merge(fresh, unload=False)
    torch.testing.assert_close(helpers.logits(fresh, batch), expected, atol=1e-5, rtol=1e-5)
    modapt.unmerge(fresh)
    for k, w in weights.items():
        assert torch.equal(fresh.get_parameter(k), w), f"unmerge did not restore {k}"
    modapt.merge(fresh, unload=True)
    assert not any(isinstance(m, modapt.AdaptedLayer) for m in fresh.modules())
    torch.testing.assert_close(helpers.logits(fresh, batch), expected, atol=1e-5, rtol=1e-5)


def test_every_paper_composition_is_a_preset(registry):
    assert set(registry.presets) == {
        "lomap", "adalomap", "flomap", "lora+lmam", "dora+lmam", "quanta+lmam", "adapter-ffn+lmam",
        "lora+adapter-ffn+lmam", "parallel+lmam", "lorma-plus", "lorma-pi"}
    for preset in registry.presets.values():
        assert preset.distribution == "modapt-composers" and ".txt" in preset.citation and "Table" in preset.citation


def test_overrides_change_a_preset(registry, helpers):
    helpers.need(registry, "map")
    recipe = modapt.parse_recipe({"preset": "lomap", "overrides": {"lora": {"r": 4},
                                                                   "map": {"init": "paper", "targets": ["c_attn"]}}}, registry)
    (entry,) = recipe.adapters
    assert entry.targets == ("c_attn",) and entry.options.init == "paper"
    assert entry.update.options.r == 4 and entry.update.options.lora_alpha == 32.0


def test_adalomap_without_total_step_names_it(registry, helpers):
    helpers.need(registry, "map", "adalora")
    with pytest.raises(modapt.RecipeError,
                       match=r"adalomap.*update\.total_step: Field required; give it with \[overrides\.adalora\] total_step"):
        modapt.parse_recipe({"preset": "adalomap"}, registry)
    assert "overrides.adalora" in registry.presets["adalomap"].description


def test_a_preset_whose_methods_are_missing_names_the_distribution(modapt_registry):
    import modapt_composers.plugin

    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    modapt_registry.register_plugin(modapt_composers.plugin, "composers", "modapt-composers")
    with pytest.raises(modapt.RecipeError, match="install modapt-lmam"):
        modapt.parse_recipe({"preset": "lora+lmam"}, modapt_registry)
