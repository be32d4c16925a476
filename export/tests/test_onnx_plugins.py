"""Attention (LMAM) and module (bottleneck) adapters cannot be merged: they must enter the ONNX
graph through the plugins' export hooks and still verify. Skipped where a plugin is missing."""

from __future__ import annotations

import pytest
import torch

import modapt
import modapt.lora
from modapt.testing import tiny_bert, tiny_llama, tiny_inputs
from modapt_export import onnx_export
from modapt_export.generate import greedy_generate
from modapt_export.ort_model import OrtModel


def _registry(*plugins):
    reg = modapt.Registry(autoload=False)
    reg.register_plugin(modapt.lora, "lora", "modapt")
    for name, module in plugins:
        reg.register_plugin(module, name, f"modapt-{name}")
    return reg


def _perturb(model, seed):
    """Every trainable tensor gets noise, so that no adapter is the identity it starts as."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _full_prefill(model, ids, mask):
    geo = {"n": model.config.num_hidden_layers, "kv": model.config.num_key_value_heads,
           "hd": model.config.hidden_size // model.config.num_attention_heads}
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past = {f"past_key_values.{i}.{kv}": torch.zeros(ids.shape[0], geo["kv"], 0, geo["hd"])
            for i in range(geo["n"]) for kv in ("key", "value")}
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}


def _check_in_graph_llama(base, adapted, out):
    """ORT equals the adapted model and differs from the base model on real tokens."""
    ids = tiny_inputs(batch=2, seq=9, padded=False)["input_ids"]
    mask = torch.ones_like(ids)
    got = OrtModel(out).run_torch(_full_prefill(adapted, ids, mask))["logits"]
    with torch.no_grad():
        want = adapted(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-2


@pytest.fixture(scope="module")
def lmam_llama(tmp_path_factory):
    lmam = pytest.importorskip("modapt_lmam.plugin")
    reg = _registry(("lmam", lmam))
    with modapt.use_registry(reg):
        recipe = {"adapter": [{"method": "lmam", "n": 6, "r": 2, "init": "random"},
                              {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4}]}
        model = _perturb(modapt.apply(tiny_llama("causal-lm", seed=11), recipe), seed=12)
        out = tmp_path_factory.mktemp("lmam") / "llama-lmam"
        manifest = onnx_export.export_onnx(model, out, "causal-lm", registry=reg)
        yield model, out, manifest


def test_lmam_enters_the_graph_and_verifies(lmam_llama):
    model, out, manifest = lmam_llama
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_error"] <= 1e-4
    assert {a["method"] for a in manifest["adapters"]} == {"lmam", "lora"}
    assert modapt.is_adapted(model) and not modapt.state_of(model).unloaded
    _check_in_graph_llama(tiny_llama("causal-lm", seed=11), model, out)


def test_lmam_cached_generation_equals_transformers(lmam_llama):
    model, out, _ = lmam_llama
    ids = torch.tensor([[5, 17, 33, 9, 71, 4], [0, 0, 12, 60, 7, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    got = greedy_generate(OrtModel(out), ids, mask, max_new_tokens=8, pad_token_id=0)
    assert got.tolist() == expected.tolist()


def test_bottleneck_with_lora_llama(tmp_path):
    bottleneck = pytest.importorskip("modapt_bottleneck.plugin")
    reg = _registry(("bottleneck", bottleneck))
    with modapt.use_registry(reg):
        recipe = {"adapter": [{"method": "bottleneck", "placement": "ffn", "r": 8},
                              {"method": "lora", "targets": "all-linear", "r": 4}]}
        model = _perturb(modapt.apply(tiny_llama("causal-lm", seed=13), recipe), seed=14)
        manifest = onnx_export.export_onnx(model, tmp_path / "out", "causal-lm", registry=reg)
    assert manifest["verification"]["max_abs_error"] <= 1e-4
    _check_in_graph_llama(tiny_llama("causal-lm", seed=13), model, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bottleneck", "lmam"])
def test_encoder_classification(method, tmp_path):
    plugin = pytest.importorskip(f"modapt_{method}.plugin")
    reg = _registry((method, plugin))
    entry = {"method": "bottleneck", "placement": "series", "r": 8} if method == "bottleneck" else \
        {"method": "lmam", "n": 6, "r": 2, "init": "random"}
    with modapt.use_registry(reg):
        model = _perturb(modapt.apply(tiny_bert("sequence-classification", seed=15), {"adapter": [entry]}), seed=16)
        manifest = onnx_export.export_onnx(model, tmp_path / "out", "sequence-classification", registry=reg)
    assert manifest["verification"]["max_abs_error"] <= 1e-4
    feeds = tiny_inputs(batch=3, seq=10)
    got = OrtModel(tmp_path / "out").run_torch(feeds)["logits"]
    with torch.no_grad():
        want = model(**feeds).logits
        plain = tiny_bert("sequence-classification", seed=15)(**feeds).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-3
