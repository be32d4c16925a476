"""Recipes: formats, validation messages (file, key path, value, accepted), presets, round trips."""

import json

import pytest

import modapt
from modapt.testing import tiny_llama

LORA = {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj"]}]}


@pytest.fixture(autouse=True)
def registry(modapt_registry):
    import modapt.lora

    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    return modapt_registry


def test_three_formats_give_the_same_recipe(tmp_path):
    (tmp_path / "r.toml").write_text('[[adapter]]\nmethod = "lora"\nr = 4\ntargets = ["q_proj"]\n')
    (tmp_path / "r.json").write_text(json.dumps(LORA))
    (tmp_path / "r.yaml").write_text("adapter:\n  - method: lora\n    r: 4\n    targets: [q_proj]\n")
    recipes = [modapt.parse_recipe(tmp_path / f"r.{ext}") for ext in ("toml", "json", "yaml")]
    assert recipes[0] == recipes[1] == recipes[2] == modapt.parse_recipe(LORA)
    assert recipes[0].adapters[0].options.r == 4 and recipes[0].adapters[0].options.lora_alpha == 8.0


@pytest.mark.parametrize("recipe, path, words", [
    ({"adapter": [{"method": "lorra", "targets": ["q"]}]}, "adapter[0].method",
     ["unknown method 'lorra'", "installed:", "did you mean 'lora'"]),
    ({"adapter": [{"method": "lora", "r": -1, "targets": ["q"]}]}, "adapter[0].r", ["greater than 0", "-1"]),
    ({"adapter": [{"method": "lora", "r": "8", "targets": ["q"]}]}, "adapter[0].r", ["integer", "'8'"]),
    ({"adapter": [{"method": "lora", "rank": 8, "targets": ["q"]}]}, "adapter[0].rank",
     ["unknown key 'rank'", "accepted:", "r, lora_alpha"]),
    ({"adapter": [{"method": "lora"}]}, "adapter[0]", ["missing key 'targets'"]),
    ({"adapter": [{"r": 8}]}, "adapter[0]", ["missing key 'method'"]),
    ({"adapters": []}, "adapters", ["unknown key 'adapters'", "did you mean 'adapter'"]),
    ({"adapter": []}, "adapter", ["no adapters"]),
    ({"adapter": [{"method": "lora", "targets": ["q"], "update": {"method": "lora"}}]}, "adapter[0].update",
     ["takes no 'update'"]),
    ({"adapter": [{"method": "additive", "targets": ["q"]}]}, "adapter[0]", ["needs an 'update' table"]),
    ({"adapter": [{"method": "additive", "targets": ["q"], "update": {"method": "additive"}}]},
     "adapter[0].update.method", ["must be an update method"]),
    ({"preset": "lomap"}, "preset", ["composers plugin", "pip install modapt-composers"]),
    ({"adapter": [{"method": "lora", "targets": 3}]}, "adapter[0].targets", ["list of non-empty strings"]),
])
def test_errors_name_key_value_and_alternatives(recipe, path, words):
    with pytest.raises(modapt.RecipeError) as info:
        modapt.parse_recipe(recipe)
    assert info.value.path == path
    for word in words:
        assert word in str(info.value), str(info.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[adapter]\nmethod = ")
    with pytest.raises(modapt.RecipeError, match="bad.toml: cannot parse TOML"):
        modapt.parse_recipe(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(modapt.RecipeError, match="not UTF-8"):
        modapt.parse_recipe(binary)
    (tmp_path / "r.ini").write_text("x")
    with pytest.raises(modapt.RecipeError, match="accepted: .toml, .json, .yaml"):
        modapt.parse_recipe(tmp_path / "r.ini")
    with pytest.raises(modapt.RecipeError, match="no such recipe file"):
        modapt.parse_recipe(tmp_path / "missing.toml")
    unknown = tmp_path / "u.toml"
    unknown.write_text('[[adapter]]\nmethod = "lora"\ntargets = ["q"]\nalpha = 3\n')
    with pytest.raises(modapt.RecipeError) as info:
        modapt.parse_recipe(unknown)
    assert str(info.value).startswith(f"{unknown}: adapter[0].alpha: unknown key 'alpha'")


def test_targets_that_match_nothing_list_close_names():
    with pytest.raises(modapt.TargetError) as info:
        modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "targets": ["q_prj"]}]})
    assert "q_proj" in str(info.value) and info.value.path == "adapter[0].targets"


def test_target_kinds_and_regex_and_class_names():
    model = tiny_llama()
    modapt.apply(model, {"adapter": [{"method": "lora", "r": 2, "targets": [r"re:.*layers\.0\..*_proj", "Embedding"]}]})
    adapted = sorted(modapt.state_of(model).layers)
    assert adapted[0] == "model.embed_tokens" and len(adapted) == 1 + 7
    with pytest.raises(modapt.TargetError, match="LlamaAttention"):
        modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "targets": ["self_attn"]}]})
    with pytest.raises(modapt.TargetError, match="invalid regular expression"):
        modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "targets": ["re:(("]}]})


def test_all_linear_skips_the_output_layer():
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "r": 2, "targets": ["all-linear"]}]})
    layers = modapt.state_of(model).layers
    assert len(layers) == 2 * 7 and "lm_head" not in layers


def test_rank_larger_than_the_layer_is_a_recipe_error_and_model_untouched():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(modapt.RecipeError, match=r"adapter\[0\].*r = 100 exceeds"):
        modapt.apply(model, {"adapter": [{"method": "lora", "r": 100, "targets": ["q_proj"]}]})
    assert not modapt.is_adapted(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m).__name__ != "AdaptedLayer" for m in model.modules())
    assert all(before[n].equal(p) for n, p in model.named_parameters())


def test_two_weight_adapters_on_one_layer_are_refused():
    with pytest.raises(modapt.RecipeError, match="targeted by both adapter\\[0\\] and adapter\\[1\\]"):
        modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "targets": ["q_proj"]},
                                                {"method": "lora", "targets": ["q_proj", "v_proj"]}]})


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml", ".yml"])
def test_round_trip(tmp_path, suffix):
    recipe = modapt.parse_recipe({"adapter": [
        {"method": "lora", "r": 3, "lora_alpha": 6.5, "use_rslora": True, "targets": ["q_proj", "re:.*v_proj"]},
        {"method": "additive", "targets": ["k_proj"], "update": {"method": "lora", "dropout": 0.25}},
    ], "modules_to_save": ["score"]})
    modapt.write_recipe(recipe, tmp_path / f"r{suffix}")
    assert modapt.parse_recipe(tmp_path / f"r{suffix}") == recipe


def test_presets_expand_with_overrides_and_detect_cycles(registry):
    def presets(register):
        register("small", {"adapter": [{"method": "lora", "r": 2, "targets": ["q_proj"]}]}, citation="test")
        register("loop-a", {"preset": "loop-b"}, citation="test")
        register("loop-b", {"preset": "loop-a"}, citation="test")
        register("needs-map", {"adapter": [{"method": "map", "targets": ["q"], "update": {"method": "lora"}}]},
                 citation="test")

    import types

    plugin = types.SimpleNamespace(modapt_register_presets=modapt.hookimpl(presets))
    registry.register_plugin(plugin, name="composers", distribution="modapt-composers")
    recipe = modapt.parse_recipe({"preset": "small", "overrides": {"lora": {"r": 5}}})
    assert recipe.adapters[0].options.r == 5 and recipe.adapters[0].targets == ("q_proj",)
    with pytest.raises(modapt.RecipeError, match="preset cycle: loop-a -> loop-b -> loop-a"):
        modapt.parse_recipe({"preset": "loop-a"})
    with pytest.raises(modapt.RecipeError, match="install modapt-map"):
        modapt.parse_recipe({"preset": "needs-map"})
    with pytest.raises(modapt.RecipeError, match="did you mean 'small'"):
        modapt.parse_recipe({"preset": "smal"})
    with pytest.raises(modapt.RecipeError, match="has no adapter with method 'dora'"):
        modapt.parse_recipe({"preset": "small", "overrides": {"dora": {"r": 5}}})
