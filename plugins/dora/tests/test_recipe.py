"""The recipe of DoRA: LoRA by default, LoRA's options in the update table, nothing else."""

import pytest

import modapt
import modapt.lora
import modapt_dora.plugin
from modapt.testing import tiny_llama


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_dora.plugin, name="dora", distribution="modapt-dora")
    return modapt_registry


def test_lora_is_the_default_update(registry):
    recipe = modapt.parse_recipe({"adapter": [{"method": "dora", "targets": ["q_proj"]}]}, registry)
    assert recipe.methods() == ["dora", "lora"]
    model = modapt.apply(tiny_llama(), recipe, registry=registry)
    names = set(modapt.trainable_parameters(model))
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector" in names
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "model.layers.0.self_attn.q_proj.lora_B.weight" in names


def test_toml_recipe(registry, tmp_path):
    path = tmp_path / "dora.toml"
    path.write_text('[[adapter]]\nmethod = "dora"\ntargets = ["q_proj", "v_proj"]\n'
                    '[adapter.update]\nmethod = "lora"\nr = 16\nlora_alpha = 32.0\ndropout = 0.05\n')
    model = modapt.apply(tiny_llama(), path, registry=registry)
    host = modapt.state_of(model).layers["model.layers.0.self_attn.q_proj"]
    assert host.lora_A.weight.shape == (16, 64) and host.update.scaling == 2.0
    assert host.lora_magnitude_vector.shape == (64,)


@pytest.mark.parametrize("key", ["r", "lora_alpha", "dropout", "magnitude"])
def test_dora_takes_no_options_of_its_own(registry, key):
    with pytest.raises(modapt.RecipeError, match=key):
        modapt.parse_recipe({"adapter": [{"method": "dora", "targets": ["q_proj"], key: 1}]}, registry)


def test_a_reparam_is_not_an_update(registry):
    with pytest.raises(modapt.RecipeError, match="update"):
        modapt.parse_recipe({"adapter": [{"method": "dora", "targets": ["q_proj"], "update": {"method": "dora"}}]},
                            registry)
