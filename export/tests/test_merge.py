"""Streaming merge: the merged checkpoint, loaded by plain transformers in a process that never
imports modapt, equals modapt's unmerged forward; untouched tensors are copied byte for byte.

One subprocess loads every merged checkpoint of the module (importing transformers once costs
seconds). LoRA carries the structural cases; every other method comes from its plugin's
``Method.example`` (entry points), on LLaMA and on GPT-2's Conv1D layers.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import modapt
import modapt.lora
from modapt.registry import Registry, use_registry
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from modapt.testing.conformance import perturb
from modapt_export import merge_checkpoint

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
# installed plugins by entry point name (no list of method names kept here)
PLUGINS = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="modapt")}
LORA4 = {"method": "lora", "r": 4, "lora_alpha": 8.0}
GPT2_TARGETS = ["c_attn", "c_fc"]  # GPT-2's Conv1D layers ([in, out] storage) for each example
# (case id, family, plugin needed or None, recipe); small max_shard_size makes many shards.
# LoRA (the core's method) carries the structural cases: embeddings, a tied weight, modules_to_save
STRUCTURAL = [
    ("llama-lora", "llama", None,
     {"adapter": [{**LORA4, "targets": ["q_proj", "v_proj", "down_proj", "embed_tokens"]}]}),
    ("gpt2-lora-tied-wte", "gpt2", None, {"adapter": [{**LORA4, "targets": ["c_attn", "c_fc", "wte"]}]}),
    ("bert-lora-head", "bert", None,
     {"adapter": [{**LORA4, "targets": ["query", "value"]}], "modules_to_save": ["classifier"]}),
]


def plugin_cases() -> list[tuple[str, str, str, dict]]:
    """One LLaMA and one GPT-2 case per mergeable method of each installed plugin, from its
    ``Method.example`` (found through the ``modapt`` entry points: no list of methods here)."""
    from modapt_export.merge import WEIGHT_FAMILIES

    cases = []
    for plugin in sorted(PLUGINS):
        try:
            methods = fresh_registry(plugin).methods
        except ImportError:  # declared but not importable: its own tests report it
            continue
        for name, method in sorted(methods.items()):
            example = method.example
            if method.plugin != plugin or name == "lora" or example is None:  # LoRA: STRUCTURAL
                continue
            if not method.capabilities.mergeable or method.family not in WEIGHT_FAMILIES:
                continue  # attachments: export onnx's business (test_onnx_plugins)
            if (example.get("update") or {}).get("method", "lora") not in methods:
                continue
            cases.append((f"llama-{name}", "llama", plugin, {"adapter": [dict(example)]}))
            cases.append((f"gpt2-{name}", "gpt2", plugin, {"adapter": [{**example, "targets": GPT2_TARGETS}]}))
    return cases


LOADER = textwrap.dedent("""
    import json, sys
    import torch, transformers
    from safetensors.torch import load_file, save_file
    jobs = json.loads(sys.argv[1])
    out = {}
    for job in jobs:
        inputs = load_file(job["inputs"])
        arch = json.load(open(job["dir"] + "/config.json"))["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(job["dir"]).eval()
        with torch.no_grad():
            out[job["name"]] = model(**inputs).logits.float().contiguous()
    leaked = sorted(m for m in sys.modules if m == "modapt" or m.startswith(("modapt.", "modapt_")))
    assert not leaked, leaked
    save_file(out, sys.argv[2])
""")


def load_plainly(jobs: list[dict], tmp: Path) -> dict[str, torch.Tensor]:
    """Logits of each merged folder, computed by transformers alone in a fresh interpreter."""
    from safetensors.torch import load_file

    result = tmp / "logits.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(result)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(result)


def fresh_registry(*plugins: str) -> Registry:
    registry = Registry(autoload=False)
    registry.register_plugin(modapt.lora, "lora", "modapt")
    for name in plugins:
        registry.register_plugin(importlib.import_module(PLUGINS[name]), name, f"modapt-{name}")
    return registry


CASES = STRUCTURAL + plugin_cases()


def raw_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every runnable case merged, and the logits plain transformers computes from each."""
    tmp = tmp_path_factory.mktemp("merge")
    results, jobs = {}, []
    for case, family, plugin, recipe in CASES:
        registry = fresh_registry(*([plugin] if plugin else []))
        with use_registry(registry):
            factory = FACTORIES[family]
            base_dir = tmp / f"{case}-base"
            factory().save_pretrained(base_dir, max_shard_size="40KB")
            model = modapt.apply(factory(), recipe)
            perturb(model, seed=3, scale=0.2)
            adapter_dir = modapt.save(model, tmp / f"{case}-adapter")
            out_dir = merge_checkpoint(base_dir, adapter_dir, tmp / f"{case}-merged")
            inputs = tiny_inputs()
            save_file({k: v.contiguous() for k, v in inputs.items()}, tmp / f"{case}-inputs.safetensors")
            with torch.no_grad():
                model.eval()
                expected = model(**inputs).logits
                base_logits = factory()(**inputs).logits
            touched = set(modapt.state_of(model).base_keys.values())
            results[case] = dict(base=base_dir, out=out_dir, expected=expected, base_logits=base_logits,
                                 touched=touched, recipe=recipe)
        jobs.append({"name": case, "dir": str(out_dir), "inputs": str(tmp / f"{case}-inputs.safetensors")})
    logits = load_plainly(jobs, tmp)
    for case in logits:
        results[case]["plain"] = logits[case]
    return results


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_plain_transformers_equals_unmerged_forward(merged, case):
    result = merged[case]
    if result is None:
        pytest.skip(f"plugin for {case} not installed")
    assert not torch.allclose(result["expected"], result["base_logits"], atol=1e-4), "the adapter does nothing"
    torch.testing.assert_close(result["plain"], result["expected"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_untouched_tensors_are_copied_byte_for_byte(merged, case):
    result = merged[case]
    if result is None:
        pytest.skip(f"plugin for {case} not installed")
    base, out = raw_tensors(result["base"]), raw_tensors(result["out"])
    replaced = set(result["touched"]) | {k for k in base if k.startswith(tuple(
        f"{m}." for m in result["recipe"].get("modules_to_save", [])))}
    assert set(base) <= set(out)
    for key, tensor in base.items():
        same = out[key].dtype == tensor.dtype and torch.equal(
            out[key].contiguous().view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8))
        assert same == (key not in replaced), key
    base_files = sorted(p.name for p in result["base"].iterdir())
    assert sorted(p.name for p in result["out"].iterdir()) == base_files  # same shards, index, side files
    index = json.loads((result["out"] / "model.safetensors.index.json").read_text())
    stored = {key: shard.name for shard in result["out"].glob("*.safetensors")
              for key in safe_open(shard, framework="pt").keys()}
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())


def test_tied_weight_is_written_apart_when_one_side_changes(merged):
    """GPT-2's wte is tied to lm_head and saved once; the adapted wte must not change the head."""
    result = merged["gpt2-lora-tied-wte"]
    base, out = raw_tensors(result["base"]), raw_tensors(result["out"])
    assert "lm_head.weight" not in base
    assert torch.equal(out["lm_head.weight"], base["transformer.wte.weight"])
    assert not torch.equal(out["transformer.wte.weight"], base["transformer.wte.weight"])
    config = json.loads((result["out"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


def test_merged_tensor_is_the_lora_formula_in_the_stored_dtype(tmp_path, modapt_registry):
    """bf16 base: W* = bf16(fp32(W0) + (alpha/r) B A), written out with explicit matrices."""
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    base = tiny_llama().to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size="50KB")
    model = modapt.apply(tiny_llama().to(torch.bfloat16),
                         {"adapter": [{"method": "lora", "r": 4, "lora_alpha": 16.0, "targets": ["k_proj"]}]})
    perturb(model, seed=5, scale=0.3)
    modapt.save(model, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    out = raw_tensors(tmp_path / "out")
    sd = modapt.adapter_state_dict(model)
    key = "model.layers.1.self_attn.k_proj"
    a, b = sd[f"{key}.lora_A.weight"].float(), sd[f"{key}.lora_B.weight"].float()
    w0 = base.state_dict()[f"{key}.weight"].float()
    expected = (w0 + (16.0 / 4) * (b @ a)).to(torch.bfloat16)
    assert out[f"{key}.weight"].dtype == torch.bfloat16
    assert torch.equal(out[f"{key}.weight"], expected)
