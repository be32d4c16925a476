"""The model with LMAM exports with ``torch.onnx.export(dynamo=True)`` after the plugin's
``modapt_prepare_export`` hook, and ONNX Runtime (CPU) matches PyTorch within 1e-4 for
padded and unpadded batches of several shapes (one graph with dynamic batch and sequence)."""

from __future__ import annotations

import pytest
import torch

import modapt
from modapt.testing.models import tiny_bert, tiny_gpt2, tiny_llama

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAMILIES = {"llama": (tiny_llama, "causal-lm"), "gpt2": (tiny_gpt2, "causal-lm"),
            "bert": (tiny_bert, "sequence-classification")}
# (batch, seq, padded): n = 6 sits inside, at and beyond these lengths
SHAPES = [(2, 8, False), (3, 4, True), (1, 12, False), (2, 10, True), (1, 1, False), (2, 6, True)]


def export_and_compare(registry, tmp_path, family, impl, **opts):
    factory, task = FAMILIES[family]
    model = factory(task=task, attn_implementation=impl, use_cache=False)
    recipe = {"adapter": [{"method": "lmam", "heads": 2, "r": 2, "n": 6, "init": "random", "scale": 0.5, **opts}]}
    model = modapt.apply(model, recipe, registry=registry)
    modapt.merge(model, unload=False)
    registry.call("modapt_prepare_export", model=model, task=task)
    assert all(hasattr(model.get_submodule(p), "lmam_attn_s") for p in modapt.state_of(model).attachments)
    sample = {"input_ids": torch.randint(3, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(model, (), kwargs=sample, dynamo=True, optimize=False, verbose=False,
                                dynamic_shapes={k: {0: batch, 1: seq} for k in sample}, output_names=["logits"])
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(9)
    for b, s, padded in SHAPES:
        ids = torch.randint(3, 128, (b, s), generator=gen)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, -2:] = 0  # right padding: every query row keeps a real key
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits.numpy()
        got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got.shape == want.shape
        assert abs(got - want).max() < 1e-4, (b, s, padded, abs(got - want).max())


def test_export_llama_gqa(registry, tmp_path):
    export_and_compare(registry, tmp_path, "llama", "sdpa")


@pytest.mark.slow
@pytest.mark.parametrize("family, impl, opts", [
    ("gpt2", "eager", {}), ("bert", "sdpa", {"align": "tail"}), ("llama", "eager", {"nonnegative": True}),
    ("llama", "sdpa", {"nonnegative": "softmax", "align": "tail"}),
])
def test_export_other_families(registry, tmp_path, family, impl, opts):
    export_and_compare(registry, tmp_path, family, impl, **opts)


@pytest.mark.parametrize("family, align", [pytest.param("llama", "head", marks=pytest.mark.slow), ("bert", "tail")])
def test_torch_export_does_not_specialise_on_n(registry, family, align):
    """torch.export with a dynamic sequence and no deferred asserts: the graph holds no guard
    on min(n, N) (a sample longer than n still serves shorter inputs, and vice versa)."""
    factory, task = FAMILIES[family]
    model = factory(task=task, attn_implementation="sdpa", use_cache=False)
    model = modapt.apply(model, {"adapter": [{"method": "lmam", "n": 6, "heads": 2, "init": "random",
                                               "align": align}]}, registry=registry)
    registry.call("modapt_prepare_export", model=model, task=task)
    sample = {"input_ids": torch.randint(3, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=256)}
    program = torch.export.export(model, (), sample, dynamic_shapes={k: dims for k in sample}, strict=False)
    for b, s, padded in SHAPES:
        ids = torch.randint(3, 128, (b, s))
        mask = torch.ones_like(ids)
        if padded:
            mask[0, -2:] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
            got = program.module()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
