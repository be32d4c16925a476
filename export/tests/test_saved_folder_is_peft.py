"""A folder from ``modapt.save`` is a PEFT folder when PEFT can express the adapter, and never one
PEFT or transformers mistake for theirs otherwise. Checked against PEFT 0.21 and transformers
themselves: their logits on the folder equal modapt's (1e-5)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import modapt
import modapt.lora
from modapt.testing import tiny_inputs, tiny_llama
from modapt.testing.conformance import perturb

peft = pytest.importorskip("peft")


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    return modapt_registry


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA saved to disk, so that the adapter records a base transformers can load."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    return path


def base(base_dir):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()


def logits(model):
    with torch.no_grad():
        return model(**tiny_inputs()).logits


def plugin(registry, name):
    module = pytest.importorskip(f"modapt_{name}.plugin")
    registry.register_plugin(module, name, f"modapt-{name}")


RECIPES = {
    # LoRA on an embedding and two projections, a fully trained lm_head
    "lora": {"adapter": [{"method": "lora", "r": 4, "lora_alpha": 8,
                          "targets": ["q_proj", "v_proj", "embed_tokens"]}], "modules_to_save": ["lm_head"]},
    "dora": {"adapter": [{"method": "dora", "targets": ["q_proj", "down_proj"], "update": {"method": "lora", "r": 4}}]},
    "adalora": {"adapter": [{"method": "adalora", "targets": ["q_proj", "v_proj"], "init_r": 4, "target_r": 2,
                             "total_step": 10}]},
}


def saved(kind, registry, base_dir, folder):
    if kind != "lora":
        plugin(registry, kind)
    model = modapt.apply(base(base_dir), RECIPES[kind], registry=registry)
    perturb(model)
    if kind == "adalora":  # a pruned rank pattern, as the allocator leaves it (mask False, Λ = 0 there):
        keep = torch.tensor([True, False, True, False])  # PEFT's files drop the pruned triplets
        q = model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            q.rank_pattern.copy_(keep)
            q.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
    modapt.save(model.eval(), folder)
    return model


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_peft_and_transformers_read_the_saved_folder(kind, registry, base_dir, tmp_path):
    from peft import PeftModel

    model = saved(kind, registry, base_dir, tmp_path / "adapter")
    expected = logits(model)
    assert not torch.allclose(expected, logits(base(base_dir)), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it ignores modapt's fields
        theirs = PeftModel.from_pretrained(base(base_dir), tmp_path / "adapter").eval()
        torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)
        # transformers 5.25's load_adapter misreads DoRA's magnitude (lora_magnitude_vector vs
        # ...vector.weight) even in folders PEFT itself saved, and has no AdaLoRA: LoRA only
        if kind == "lora":
            plain = base(base_dir)
            plain.load_adapter(str(tmp_path / "adapter"))
            torch.testing.assert_close(logits(plain.eval()), expected, atol=1e-5, rtol=0)
    # and modapt reads its own tensors back, bit for bit
    again = modapt.load(base(base_dir), tmp_path / "adapter", registry=registry)
    torch.testing.assert_close(logits(again), expected, atol=0, rtol=0)


def test_auto_model_from_the_adapter_folder(registry, base_dir, tmp_path):
    """``AutoModelForCausalLM.from_pretrained(adapter_dir)``: the recorded base, then the adapter."""
    import transformers

    model = saved("lora", registry, base_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["peft_type"] == "LORA"
    assert config["format"] == "modapt-adapter" and "recipe" in config and "base_fingerprint" in config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(auto), logits(model), atol=1e-5, rtol=0)


def test_a_map_folder_is_not_mistaken_for_peft(registry, base_dir, tmp_path):
    """No adapter_config.json: PEFT refuses with its own clear error, transformers finds no adapter."""
    import transformers
    from peft import PeftModel

    plugin(registry, "map")
    model = modapt.apply(base(base_dir), {"adapter": [{"method": "map", "targets": ["q_proj"],
                                                       "update": {"method": "lora", "r": 2}}]}, registry=registry)
    modapt.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["modapt_adapter.json",
                                                                        "modapt_adapter.safetensors"]
    with pytest.raises(ValueError, match="adapter_config.json") as info:
        PeftModel.from_pretrained(base(base_dir), tmp_path / "adapter")
    assert not isinstance(info.value, KeyError)
    with pytest.raises((OSError, ValueError), match="config.json") as info:  # no adapter detected: no model there
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert not isinstance(info.value, KeyError)
    plain = base(base_dir)
    with pytest.raises(ValueError, match="adapter"):
        plain.load_adapter(str(tmp_path / "adapter"))
    modapt.load(base(base_dir), tmp_path / "adapter", registry=registry)


def test_export_peft_command_converts_a_format_1_folder(registry, base_dir, tmp_path, capsys):
    """``modapt export peft`` on a folder saved by the previous release (core/tests/fixtures)."""
    from pathlib import Path

    import modapt_export.plugin
    from modapt.cli import main
    from peft import PeftModel

    registry.register_plugin(modapt_export.plugin, "export", "modapt-export")
    fixture = Path(modapt.__file__).parents[2] / "tests" / "fixtures" / "format1_lora_r2"
    code = main(["export", "peft", "--adapter", str(fixture), "--out", str(tmp_path / "peft"),
                 "--base", str(base_dir)])
    assert code == 0, capsys.readouterr().err
    expected = logits(modapt.load(base(base_dir), fixture, registry=registry))
    theirs = PeftModel.from_pretrained(base(base_dir), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)
    # an existing output is refused without --overwrite, in one line
    capsys.readouterr()
    assert main(["export", "peft", "--adapter", str(fixture), "--out", str(tmp_path / "peft"),
                 "--base", str(base_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [-2, 4], "data_offsets": [0, 32]}, "not a list of integers >= 0"),
    ({"dtype": "F32", "shape": ["2", 4], "data_offsets": [0, 32]}, "not a list of integers >= 0"),
    ("[" * 10_000 + "]" * 10_000, "nested deeper"),
], ids=["negative-shape", "string-shape", "deep"])
def test_a_hostile_base_shard_header_is_one_line(tmp_path, entry, match):
    from modapt_export.shards import CheckpointError, read_header

    text = ('{"w": ' + entry + "}") if isinstance(entry, str) else json.dumps({"w": entry})
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text.encode() + bytes(32))
    with pytest.raises(CheckpointError, match=match) as info:
        read_header(path)
    assert "\n" not in str(info.value)

