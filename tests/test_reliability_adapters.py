"""Adapter files from strangers: every bad file is refused with a clear error and the model untouched.

Extends core/tests/test_persistence.py (which covers a truncated file with its sha256, wrong
shapes, a newer format, a pickle-only folder, another base of the same shapes): here the
hand-edited cases whose config was *also* edited to match (so only the loader's own checks
stand between the file and the model), broken configs, and proof that no pickle is unpickled.
"""

from __future__ import annotations

import json
import pickle

import modapt
import pytest
import torch
from modapt.persistence import file_sha256
from modapt.testing import tiny_gpt2, tiny_llama
from modapt.testing.conformance import perturb
from safetensors.torch import load_file, save_file

RECIPE = {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}], "modules_to_save": ["lm_head"]}
A = "model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(autouse=True)
def registry(modapt_registry):
    import modapt.lora

    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    return modapt_registry


@pytest.fixture
def saved(tmp_path):
    model = modapt.apply(tiny_llama(), RECIPE)
    perturb(model)
    return modapt.save(model, tmp_path / "adapter")


def rewrite(path, edit):
    """Edit the tensors and re-sign the config, as a careful hand-editor would."""
    tensors = load_file(path / "modapt_adapter.safetensors")
    edit(tensors)
    save_file(tensors, path / "modapt_adapter.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    config["weights"]["sha256"] = file_sha256(path / "modapt_adapter.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(config))


def refused(path, match, model=None):
    model = model if model is not None else tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(modapt.AdapterLoadError, match=match):
        modapt.load(model, path)
    assert not modapt.is_adapted(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(m).__name__ != "AdaptedLayer" for m in model.modules())


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.__setitem__(A, t[A].to(torch.float16)), r"lora_A.weight' has dtype torch.float16, expected"),
    (lambda t: t.__setitem__(A, t[A].to(torch.float64)), r"has dtype torch.float64"),
    (lambda t: t.pop(A), r"tensor '.*lora_A.weight' is missing"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)),
     r"unexpected tensor 'model.layers.0.mlp.up_proj.lora_A.weight'"),
    (lambda t: t[A].__setitem__((0, 0), float("nan")), r"lora_A.weight' has NaN or Inf"),
    (lambda t: t["lm_head.weight"].__setitem__((1, 1), float("-inf")), r"lm_head.weight' has NaN or Inf"),
    (lambda t: t.__setitem__(A, t[A].T.contiguous()), r"has shape \[64, 4\], this model needs \[4, 64\]"),
    (lambda t: t.clear(), r"is missing"),
], ids=["fp16", "fp64", "missing", "extra", "nan", "inf", "transposed", "empty"])
def test_hand_edited_tensors_with_a_matching_sha_are_refused(saved, edit, match):
    rewrite(saved, edit)
    refused(saved, match)


def test_garbage_with_a_matching_sha_is_refused(saved):
    """The sha256 only proves the pair belongs together; the safetensors reader still checks the bytes."""
    weights = saved / "modapt_adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # a header length past the end of the file
    weights.write_bytes(bytes(data))
    config = json.loads((saved / "adapter_config.json").read_text())
    config["weights"]["sha256"] = file_sha256(weights)
    (saved / "adapter_config.json").write_text(json.dumps(config))
    refused(saved, "safetensors header length .* does not fit the file")


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe{not utf8", "not valid JSON"),
    (b"{\"format\": \"modapt-adapter\", ", "not valid JSON"),
    (b"[1, 2, 3]", "expected a JSON object"),
    (b"{\"format\": \"modapt-adapter\", \"format_version\": \"1\"}", "format_version must be an integer"),
    (b"{\"format\": \"modapt-adapter\", \"format_version\": 0}", "unknown format version 0"),
    (b"{\"format\": \"modapt-adapter\", \"format_version\": 3}", "format version 3 is newer"),
    (b"{\"format\": \"modapt-adapter\", \"format_version\": 1}", "missing or invalid 'recipe'"),
    (b"{\"peft_type\": \"LORA\", \"r\": 8}", "is a PEFT adapter"),
], ids=["non-utf8", "truncated-json", "list", "version-string", "version-0", "version-3", "no-recipe", "peft"])
def test_broken_configs_are_refused(saved, content, match):
    (saved / "adapter_config.json").write_bytes(content)
    refused(saved, match)


def test_a_recipe_edited_into_nonsense_is_refused(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["recipe"]["adapter"][0]["r"] = -3
    (saved / "adapter_config.json").write_text(json.dumps(config))
    refused(saved, r"saved recipe cannot be used here: .*adapter\[0\]\.r")


def test_adapter_of_another_architecture_is_refused(saved):
    """A LLaMA adapter onto GPT-2: the fingerprint names a tensor this model does not have."""
    refused(saved, "is missing from this model", model=tiny_gpt2())


def test_missing_weights_file_is_refused(saved):
    (saved / "modapt_adapter.safetensors").unlink()
    refused(saved, "no modapt_adapter.safetensors")


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin"])
def test_pickle_adapters_are_refused_and_never_unpickled(tmp_path, monkeypatch, name):
    """A real pickle that would run code when loaded: refused with a message, pickle never called."""
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append("pickle.load"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("pickle.loads"))
    (tmp_path / name).write_bytes(pickle.dumps({"lora_A": [1.0]}))
    model = tiny_llama()
    with pytest.raises(modapt.AdapterLoadError, match=f"{name} found: pickle files are never loaded"):
        modapt.load(model, tmp_path)
    assert calls == [] and not modapt.is_adapted(model)


def test_a_pickle_beside_a_valid_adapter_is_ignored(saved, monkeypatch):
    """Loading reads only the config and the safetensors file, whatever else lies in the folder."""
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("pickle.loads"))
    (saved / "adapter_model.bin").write_bytes(pickle.dumps({A: torch.ones(4, 64)}))
    model = modapt.load(tiny_llama(), saved)
    assert calls == [] and modapt.is_adapted(model)
    assert not torch.equal(modapt.adapter_state_dict(model)[A], torch.ones(4, 64))
