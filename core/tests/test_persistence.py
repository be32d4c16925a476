"""Saving and loading adapters: bit-exact across processes, refusals that leave the model untouched."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import modapt
from modapt.testing import tiny_inputs, tiny_llama
from modapt.testing.conformance import perturb

RECIPE = {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj", "embed_tokens"]}],
          "modules_to_save": ["lm_head"]}


@pytest.fixture(autouse=True)
def registry(modapt_registry):
    """Only the core's LoRA: these tests must not depend on which plugins are installed."""
    import modapt.lora

    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    return modapt_registry


@pytest.fixture
def saved(tmp_path):
    model = modapt.apply(tiny_llama(), RECIPE)
    perturb(model)
    modapt.save(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert not modapt.is_adapted(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_files_and_names(saved):
    model, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["format"] == "modapt-adapter" and config["format_version"] == 2
    assert config["recipe"]["adapter"][0]["method"] == "lora"
    assert "modapt" in config["versions"]
    fp = config["base_fingerprint"]
    assert sorted(fp["tensors"]) == sorted(["model.embed_tokens.weight"] + [
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")])
    from safetensors import safe_open

    with safe_open(path / "modapt_adapter.safetensors", "pt") as f:
        names = set(f.keys())
    assert names == set(modapt.trainable_parameters(model))
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names and "lm_head.weight" in names


def test_fingerprint_is_the_documented_algorithm(saved):
    """sha256 over (key, dtype, shape, raw bytes) of the touched base tensors sorted by key, recomputed here."""
    import hashlib

    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    base = tiny_llama().state_dict()
    h = hashlib.sha256()
    for key in sorted(config["base_fingerprint"]["tensors"]):
        t = base[key]
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().numpy().tobytes())
    assert config["base_fingerprint"]["sha256"] == h.hexdigest()


def test_loads_bit_exactly_in_another_process(saved, tmp_path):
    model, path = saved
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, modapt
        from modapt.testing import tiny_llama, tiny_inputs
        model = modapt.load(tiny_llama(), {str(path)!r})
        with torch.no_grad():
            got = model(**tiny_inputs()).logits
        assert torch.equal(got, torch.load({str(tmp_path / 'expected.pt')!r})), (got - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_other_weights_same_shapes_is_refused(saved):
    _, path = saved
    other = tiny_llama(seed=7)
    before = snapshot(other)
    with pytest.raises(modapt.AdapterLoadError, match="model.embed_tokens.weight' has other values"):
        modapt.load(other, path)
    assert_untouched(other, before)
    modapt.load(other, path, verify_base=False)  # the user can insist
    assert modapt.is_adapted(other)


def test_other_shapes_is_refused_naming_the_tensor(saved):
    _, path = saved
    other = tiny_llama(hidden_size=32, intermediate_size=48)
    before = snapshot(other)
    with pytest.raises(modapt.AdapterLoadError, match=r"'model.embed_tokens.weight' has shape \[128, 32\]"):
        modapt.load(other, path)
    assert_untouched(other, before)


def test_tampered_files_are_refused(saved):
    _, path = saved
    weights = path / "modapt_adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(modapt.AdapterLoadError, match="truncated"):
        modapt.load(base, path)
    assert_untouched(base, before)


def test_wrong_shapes_in_a_consistent_file_are_refused(saved):
    """A hand-edited adapter whose config was updated too: shapes are still checked, model restored."""
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(path / "modapt_adapter.safetensors")
    tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(5, 64)
    save_file(tensors, path / "modapt_adapter.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    config["weights"]["sha256"] = modapt.persistence.file_sha256(path / "modapt_adapter.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(modapt.AdapterLoadError, match=r"lora_A.weight' has shape \[5, 64\], this model needs \[4, 64\]"):
        modapt.load(base, path)
    assert_untouched(base, before)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(format_version=99), "format version 99 is newer"),
    (lambda c: (c.update(format="other"), c.pop("peft_type")), "not a modapt adapter"),
    (lambda c: c["recipe"]["adapter"][0].update(method="map"), "install modapt-map"),
])
def test_config_problems_are_refused(saved, edit, message):
    _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    edit(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(modapt.AdapterLoadError, match=message):
        modapt.load(tiny_llama(), path)


def test_pickle_is_never_loaded(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(modapt.AdapterLoadError, match="pickle files are never loaded"):
        modapt.load(tiny_llama(), tmp_path)


def test_save_replaces_atomically(saved):
    model, path = saved
    before = (path / "modapt_adapter.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(modapt.trainable_parameters(model).values())).add_(1)
    modapt.save(model, path)
    assert (path / "modapt_adapter.safetensors").read_bytes() != before
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "modapt_adapter.safetensors"]
    # the swap leaves nothing beside the folder: no lock file, no temporary copies
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]
