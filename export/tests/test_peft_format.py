"""PEFT interop against peft itself: a PEFT model and the modapt model loaded from its files give
the same outputs, and a modapt adapter written in PEFT's format loads in PEFT with the same
outputs. A PEFT adapter folder also merges directly into a plain checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import modapt
import modapt.lora
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from modapt_export import merge_checkpoint
from modapt_export.peft_format import PeftFormatError, load_peft, save_peft

peft = pytest.importorskip("peft")

ADALORA = {"init_r": 4, "target_r": 2, "total_step": 10}


def _config(kind):
    from peft import AdaLoraConfig, LoraConfig

    return {
        # embedding LoRA, per-layer rank and alpha (PEFT's patterns), a fully trained head
        "lora-llama": (tiny_llama, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                              rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3},
                                              modules_to_save=["lm_head"]), None),
        "lora-gpt2": (tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                            use_rslora=True), None),
        "lora-bert": (tiny_bert, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]),
                      None),
        "dora-llama": (tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True), "dora"),
        "adalora-llama": (tiny_llama, AdaLoraConfig(target_modules=["q_proj", "v_proj"], **ADALORA), "adalora"),
    }[kind]


KINDS = ["lora-llama", "lora-gpt2", "lora-bert", "dora-llama", "adalora-llama"]


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    return modapt_registry


def _peft_model(kind, registry):
    factory, config, plugin = _config(kind)
    if plugin:
        module = pytest.importorskip(f"modapt_{plugin}.plugin")
        registry.register_plugin(module, plugin, f"modapt-{plugin}")
    from peft import get_peft_model

    model = get_peft_model(factory(), config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # away from PEFT's init (B = 0, E = 0), so the adapter matters
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    if kind.startswith("adalora"):  # a pruned rank pattern, as after PEFT's update_and_allocate
        keep = [[True, False, True, False], [True] * 4, [False, False, False, True], [True, True, False, True]]
        pattern = {f"model.layers.{i}.self_attn.{p}.lora_E": keep[2 * i + j]
                   for i in range(2) for j, p in enumerate(["q_proj", "v_proj"])}
        model.peft_config["default"].rank_pattern = pattern
        model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, pattern)
    return factory, model.eval()


def _logits(model):
    with torch.no_grad():
        return model(**tiny_inputs()).logits


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_peft_to_modapt_and_back(kind, registry, tmp_path):
    factory, peft_model = _peft_model(kind, registry)
    peft_model.save_pretrained(tmp_path / "peft")
    reference = _logits(peft_model)
    assert not torch.allclose(reference, _logits(factory()), atol=1e-4)

    ours = load_peft(factory(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(ours), reference, atol=1e-5, rtol=0)

    save_peft(ours, tmp_path / "back")
    from peft import PeftModel

    again = PeftModel.from_pretrained(factory(), tmp_path / "back").eval()
    torch.testing.assert_close(_logits(again), reference, atol=1e-5, rtol=0)


def test_adalora_pruned_triplets_are_dropped_in_peft_files(registry, tmp_path):
    factory, peft_model = _peft_model("adalora-llama", registry)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_peft(factory(), tmp_path / "peft")
    mask = ours.model.layers[1].self_attn.q_proj.rank_pattern
    assert mask.tolist() == [False, False, False, True]
    save_peft(ours, tmp_path / "back")
    from safetensors.torch import load_file

    written = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert written["base_model.model.model.layers.1.self_attn.q_proj.lora_A"].shape == (1, 64)
    assert written["base_model.model.model.layers.1.self_attn.q_proj.lora_B"].shape == (64, 1)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["rank_pattern"]["model.layers.1.self_attn.q_proj.lora_E"] == [False, False, False, True]


@pytest.mark.parametrize("kind", ["lora-llama", "dora-llama"])
def test_merge_accepts_a_peft_folder(kind, registry, tmp_path):
    """``merge_checkpoint`` on PEFT's files equals PEFT's own merge_and_unload."""
    factory, peft_model = _peft_model(kind, registry)
    factory().save_pretrained(tmp_path / "base", max_shard_size="60KB")
    peft_model.save_pretrained(tmp_path / "peft")
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "out")
    import transformers

    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = _logits(peft_model.merge_and_unload())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)


def test_unsupported_peft_options_are_refused(registry, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match="use_dora"):  # no dora plugin in this registry
        load_peft(tiny_llama(), tmp_path)


def test_mixed_methods_cannot_be_one_peft_folder(registry, tmp_path):
    adalora = pytest.importorskip("modapt_adalora.plugin")
    registry.register_plugin(adalora, "adalora", "modapt-adalora")
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "targets": ["q_proj"]},
                                                    {"method": "adalora", "targets": ["v_proj"], **ADALORA}]})
    with pytest.raises(PeftFormatError, match="one adapter type"):
        save_peft(model, tmp_path)
