"""Building, merging and taking LMAM off; recipe errors; composition with LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

import modapt
from modapt.testing.models import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from modapt_lmam import attention_map

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
ATTENTION = {"llama": "model.layers.{}.self_attn", "gpt2": "transformer.h.{}.attn",
             "bert": "bert.encoder.layer.{}.attention.self"}


def output(model, batch):
    out = model(**batch)
    return out.logits


def lmam(**opts):
    return {"adapter": [{"method": "lmam", **opts}]}


@pytest.mark.parametrize("family", list(FACTORIES))
def test_default_targets_names_and_shapes(registry, family):
    model = modapt.apply(FACTORIES[family](), lmam(heads=2, r=3, n=5), registry=registry)
    paths = [ATTENTION[family].format(i) for i in range(2)]
    assert list(modapt.state_of(model).attachments) == paths
    trainable = modapt.trainable_parameters(model)
    assert sorted(trainable) == sorted(f"{p}.{k}" for p in paths for k in ("lmam_Wa", "lmam_Wb"))
    assert trainable[f"{paths[0]}.lmam_Wa"].shape == (2, 5, 3)
    assert trainable[f"{paths[0]}.lmam_Wb"].shape == (2, 3, 5)
    assert set(modapt.adapter_state_dict(model)) == set(trainable)  # P_a, P_b are not saved


@pytest.mark.parametrize("family", list(FACTORIES))
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_zero_init_equals_base_and_trains(registry, family, impl):
    base = FACTORIES[family](attn_implementation=impl)
    model = modapt.apply(copy.deepcopy(base), lmam(heads=2, r=2, n=6, scale=3.0), registry=registry)
    batch = tiny_inputs()
    for module in model.modules():
        if hasattr(module, "lmam_Wa"):
            assert torch.equal(attention_map.compute_map(module, 3.0), torch.zeros(2, 6, 6))
    with torch.no_grad():
        torch.testing.assert_close(output(model, batch), output(base, batch), atol=1e-6, rtol=0)
    output(model, batch).pow(2).sum().backward()
    grads = {n: p.grad for n, p in modapt.trainable_parameters(model).items()}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().max() > 0 for n, g in grads.items() if n.endswith("lmam_Wa")), "W_a gets no gradient"


def test_full_rank_zero_init(registry):
    model = modapt.apply(tiny_llama(), lmam(n=6, full_rank=True), registry=registry)
    names = sorted(modapt.trainable_parameters(model))
    assert names == ["model.layers.0.self_attn.lmam_W", "model.layers.1.self_attn.lmam_W"]
    assert model.model.layers[0].self_attn.lmam_W.shape == (4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(output(model, tiny_inputs()), output(tiny_llama(), tiny_inputs()), atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_remove_restores_module_and_implementation(registry, impl):
    base = tiny_llama(attn_implementation=impl)
    reference = copy.deepcopy(base)
    model = modapt.apply(base, lmam(heads=2, n=6, init="random"), registry=registry)
    assert model.config._attn_implementation == f"lmam+{impl}"
    modapt.merge(model, unload=False)
    modapt.remove(model)
    assert model.config._attn_implementation == impl
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert dict(model.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    for module in model.modules():
        assert not any(k.startswith("_modapt_lmam") for k in module.__dict__)
    batch = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(output(model, batch), output(reference, batch))


def test_merge_keeps_constant_map(registry):
    model = modapt.apply(tiny_gpt2(), lmam(heads=2, r=2, n=6, init="random"), registry=registry)
    batch = tiny_inputs()
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        before = output(model, batch)
        modapt.merge(model, unload=True)  # LMAM cannot fold: it stays, as a constant map
        assert modapt.is_adapted(model)
        merged = attn.lmam_attn_s
        assert merged.shape == (2, 6, 6) and not merged.requires_grad
        torch.testing.assert_close(merged, attention_map.compute_map(attn, 1.0))
        assert "lmam_attn_s" not in model.state_dict() and attn.lmam_Wa.requires_grad
        torch.testing.assert_close(output(model, batch), before, atol=1e-6, rtol=0)


def test_lora_plus_lmam(registry):
    recipe = {"adapter": [
        {"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]},
        {"method": "lmam", "heads": 2, "r": 2, "n": 6, "init": "random"},
    ]}
    model = modapt.apply(tiny_llama(), recipe, registry=registry)
    names = set(modapt.trainable_parameters(model))
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "model.layers.0.self_attn.lmam_Wa" in names
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.add_(0.1)
        batch = tiny_inputs()
        before = output(model, batch)
        modapt.merge(model, unload=True)
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
        torch.testing.assert_close(output(model, batch), before, atol=1e-5, rtol=1e-5)
        modapt.remove(model)
        assert model.config._attn_implementation == "eager"


def test_partial_targets_leave_other_layers_alone(registry):
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lmam", "n": 6, "init": "random",
                                                     "targets": ["model.layers.1.self_attn"]}]}, registry=registry)
    assert list(modapt.state_of(model).attachments) == ["model.layers.1.self_attn"]
    assert not hasattr(model.model.layers[0].self_attn, "lmam_Wa")


@pytest.mark.parametrize("entry, words", [
    ({"heads": 3}, ["heads = 3", "1, 2, 4"]),
    ({"targets": ["q_proj"]}, ["AttentionInterface"]),
    ({"r": 9, "n": 4}, ["r = 9", "full_rank"]),
    ({"align": "middle"}, ["align", "head", "tail"]),
    ({"nonnegative": "yes"}, ["nonnegative", "softmax"]),
    ({"rank": 2}, ["rank"]),
])
def test_recipe_errors(registry, entry, words):
    with pytest.raises(modapt.RecipeError) as info:
        modapt.apply(tiny_llama(), lmam(**entry), registry=registry)
    for word in words:
        assert word in str(info.value)


def test_unsupported_implementation(registry):
    model = tiny_llama()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(modapt.RecipeError, match="supported: eager, sdpa"):
        modapt.apply(model, lmam(), registry=registry)
    assert model.config._attn_implementation == "flex_attention"


def test_capabilities(registry):
    method = registry.method("lmam")
    assert method.family == "attention"
    caps = method.capabilities
    assert (caps.mergeable, caps.exportable, caps.identity_at_init) == (False, True, True)
    assert caps.composes_with == {"update", "reparam", "module"}


def test_remove_on_a_deep_copy(registry):
    model = modapt.apply(tiny_llama(attn_implementation="sdpa"), lmam(n=6), registry=registry)
    clone = copy.deepcopy(model)
    modapt.remove(clone)
    assert clone.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "lmam+sdpa"
    modapt.remove(model)
    assert model.config._attn_implementation == "sdpa"
