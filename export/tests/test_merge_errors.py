"""The merge refuses what it cannot do right, and leaves no output folder behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import modapt
import modapt.lora
from modapt.testing import tiny_llama
from modapt.testing.conformance import perturb
from modapt_export import CheckpointError, MergeError, merge_checkpoint

RECIPE = {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}]}


@pytest.fixture
def setup(tmp_path, modapt_registry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="60KB")
    model = modapt.apply(tiny_llama(), RECIPE)
    perturb(model)
    modapt.save(model, tmp_path / "adapter")
    return tmp_path


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("base", "adapter"))


def test_corrupted_base_tensor_is_refused(setup):
    index = json.loads((setup / "base" / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.v_proj.weight"
    shard = setup / "base" / index["weight_map"][key]
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:header])[key]["data_offsets"][0]
    data[header + begin + 5] ^= 0x40  # one flipped bit inside the adapted tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(MergeError, match="v_proj.weight' has other values"):
        merge_checkpoint(setup / "base", setup / "adapter", setup / "out")
    assert leftovers(setup) == []


def test_base_of_another_model_is_refused(setup, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    tiny_llama(seed=1).save_pretrained(other, max_shard_size="60KB")
    with pytest.raises(MergeError, match="not the one the adapter was trained on"):
        merge_checkpoint(other, setup / "adapter", setup / "out")
    assert leftovers(setup) == []


def test_truncated_shard_is_refused(setup):
    shard = sorted((setup / "base").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        merge_checkpoint(setup / "base", setup / "adapter", setup / "out")
    assert leftovers(setup) == []


def test_nan_in_merged_weight_stops_the_merge(setup, modapt_registry):
    model = modapt.apply(tiny_llama(), RECIPE)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B.weight[0, 0] = float("inf")
    modapt.save(model, setup / "bad")
    with pytest.raises(MergeError, match="NaN or Inf"):
        merge_checkpoint(setup / "base", setup / "bad", setup / "out")
    assert leftovers(setup) == ["bad"]
    merge_checkpoint(setup / "base", setup / "bad", setup / "out", safe=False)  # the user's explicit choice
    assert (setup / "out" / "model.safetensors.index.json").is_file()


def test_existing_output_folder_is_not_overwritten(setup):
    (setup / "out").mkdir()
    (setup / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists"):
        merge_checkpoint(setup / "base", setup / "adapter", setup / "out")
    assert (setup / "out" / "keep.txt").read_text() == "mine"
    merge_checkpoint(setup / "base", setup / "adapter", setup / "out", overwrite=True)
    assert not (setup / "out" / "keep.txt").exists()
    assert leftovers(setup) == ["out"]


class _Scale(modapt.Attachment):
    def detach(self):
        del self.module.fake_gate


class _FakeAttentionPlugin:
    """An attention-family method that cannot fold into weights (as LMAM)."""

    class Options(modapt.Options):
        pass

    @staticmethod
    def _build(module, options, model):
        module.register_parameter("fake_gate", nn.Parameter(torch.ones(())))
        return _Scale(module, options)

    @modapt.hookimpl
    def modapt_register_methods(self, register):
        register(modapt.Method(name="fakeattn", family="attention", options=self.Options, build=self._build,
                               own_keys=("fake_gate",), capabilities=modapt.Capabilities(mergeable=False)))


def test_unfoldable_adapter_points_to_onnx(setup, modapt_registry):
    modapt_registry.register_plugin(_FakeAttentionPlugin(), "fakeattn", "fake")
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "fakeattn", "targets": ["self_attn"]}]})
    modapt.save(model, setup / "attn")
    with pytest.raises(MergeError, match="modapt export onnx"):
        merge_checkpoint(setup / "base", setup / "attn", setup / "out")
    assert leftovers(setup) == ["attn"]


def _cli(*args):
    env = {**os.environ, "MODAPT_PLUGINS": "export,lora"}
    return subprocess.run([sys.executable, "-m", "modapt.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_merges_and_reports_errors_without_traceback(setup):
    ok = _cli("merge", "--base", str(setup / "base"), "--adapter", str(setup / "adapter"), "--out", str(setup / "o"))
    assert ok.returncode == 0, ok.stderr
    assert (setup / "o" / "config.json").is_file()
    again = _cli("merge", "--base", str(setup / "base"), "--adapter", str(setup / "adapter"), "--out", str(setup / "o"))
    assert again.returncode == 1
    assert "exists" in again.stderr and "Traceback" not in again.stderr
