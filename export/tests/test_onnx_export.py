"""ONNX export on tiny random models: I/O contract, self-verification, merged weight adapters,
cached greedy generation against transformers' ``generate``, failure handling, the CLI.

Exports take 5-15 s each on 2 cores, so each one is a module-scoped fixture shared by tests.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import modapt
import modapt.lora
from modapt.testing import tiny_bert, tiny_gpt2, tiny_llama, tiny_inputs
from modapt_export import onnx_export
from modapt_export.generate import greedy_generate
from modapt_export.onnx_verify import VerificationError
from modapt_export.ort_model import OrtModel

LORA = {"adapter": [{"method": "lora", "targets": "all-linear", "r": 4}]}


@pytest.fixture(scope="module")
def registry():
    """LoRA only, entry points off, made the default for the module's exports."""
    reg = modapt.Registry(autoload=False)
    reg.register_plugin(modapt.lora, "lora", "modapt")
    with modapt.use_registry(reg):
        yield reg


def _randomise_lora(model, seed=3):
    """LoRA starts with B = 0 (a no-op); give B values so that the merged graph must differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in modapt.trainable_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _export(tmp_path_factory, model, task, name, **kw):
    out = tmp_path_factory.mktemp("onnx") / name
    manifest = onnx_export.export_onnx(model, out, task, **kw)
    return out, manifest


@pytest.fixture(scope="module")
def llama_lm(registry, tmp_path_factory):
    model = tiny_llama("causal-lm", seed=0)
    out, manifest = _export(tmp_path_factory, model, "causal-lm", "llama")
    return model, out, manifest


@pytest.fixture(scope="module")
def llama_lm_lora(registry, tmp_path_factory):
    model = _randomise_lora(modapt.apply(tiny_llama("causal-lm", seed=0), LORA))
    out, manifest = _export(tmp_path_factory, model, "causal-lm", "llama-lora")
    return model, out, manifest


# --- the causal-lm contract ---------------------------------------------------------------------

def test_causal_lm_io_contract(llama_lm):
    model, out, manifest = llama_lm
    graph = onnx.load_model(str(out / "model.onnx"), load_external_data=False).graph
    n = model.config.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in graph.output] == ["logits", *present]
    types = {v.name: v.type.tensor_type for v in [*graph.input, *graph.output]}
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert types[name].elem_type == onnx.TensorProto.INT64
    dims = {k: [d.dim_param or d.dim_value for d in t.shape.dim] for k, t in types.items()}
    assert dims["input_ids"] == ["batch", "seq"] and dims["position_ids"] == ["batch", "seq"]
    assert dims["attention_mask"][0] == "batch" and isinstance(dims["attention_mask"][1], str)
    # [batch, kv_heads=2, past, head_dim=16], all dynamic but the head geometry
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_len", 16]
    assert dims["present.1.value"][:2] == ["batch", 2] and dims["present.1.value"][3] == 16
    assert dims["logits"] == ["batch", "seq", 128]
    assert manifest["cache"] == {"num_layers": 2, "kv_heads": 2, "head_dim": 16,
                                 "layout": "[batch, kv_heads, length, head_dim]"}


def test_versions_and_files(llama_lm):
    _, out, manifest = llama_lm
    proto = onnx.load_model(str(out / "model.onnx"))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert proto.ir_version <= 10 and opset != 23 and opset == manifest["opset"]
    assert (out / "config.json").is_file() and (out / "modapt_export.json").is_file()
    assert not (out / "model.onnx.data").exists()  # tiny: weights inline
    on_disk = json.loads((out / "modapt_export.json").read_text())
    assert on_disk["verification"]["passed"] and on_disk["verification"]["max_abs_error"] <= 1e-4
    assert len(on_disk["verification"]["cases"]) >= 4
    assert any(c["padding"] != "none" and c["batch"] >= 2 for c in on_disk["verification"]["cases"])
    assert {i["name"] for i in on_disk["inputs"]} >= {"input_ids", "attention_mask", "position_ids"}
    assert not list(out.parent.glob(".*partial*"))


def test_prefill_then_steps_equal_full_forward(llama_lm):
    """Independent of the verifier: the graph run with its own cache step by step gives the
    logits that the plain PyTorch forward gives over the whole sequence."""
    model, out, _ = llama_lm
    ort = OrtModel(out)
    ids = tiny_inputs(batch=1, seq=9, padded=False)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    past = {f"past_key_values.{i}.{kv}": torch.zeros(1, 2, 0, 16) for i in range(2) for kv in ("key", "value")}
    got = []
    for start, stop in [(0, 5), (5, 6), (6, 9)]:
        feeds = {"input_ids": ids[:, start:stop], "attention_mask": torch.ones(1, stop, dtype=torch.long),
                 "position_ids": torch.arange(start, stop)[None], **past}
        res = ort.run_torch(feeds)
        got.append(res["logits"])
        past = {k.replace("present.", "past_key_values."): v for k, v in res.items() if k.startswith("present.")}
        assert past["past_key_values.0.key"].shape == (1, 2, stop, 16)
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_equals_transformers(llama_lm, batch):
    model, out, _ = llama_lm
    ids = torch.tensor([[5, 17, 33, 9, 71, 4, 88], [0, 0, 0, 12, 60, 7, 3]])[:batch]
    mask = (ids != 0).long() if batch == 2 else torch.ones_like(ids)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  eos_token_id=eos, pad_token_id=0)
    got = greedy_generate(OrtModel(out), ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert got.tolist() == expected.tolist()


# --- weight adapters are merged before export -----------------------------------------------------

def test_merged_lora_has_base_node_count(llama_lm, llama_lm_lora):
    _, base_out, base_manifest = llama_lm
    _, lora_out, lora_manifest = llama_lm_lora
    n_base = len(onnx.load_model(str(base_out / "model.onnx")).graph.node)
    n_lora = len(onnx.load_model(str(lora_out / "model.onnx")).graph.node)
    assert n_lora == n_base == base_manifest["nodes"] == lora_manifest["nodes"]
    assert lora_manifest["adapters"][0]["method"] == "lora"


def test_merged_lora_graph_computes_the_adapted_model(llama_lm, llama_lm_lora):
    base, _, _ = llama_lm
    adapted, out, manifest = llama_lm_lora
    assert manifest["verification"]["max_abs_error"] <= 1e-4
    assert modapt.is_adapted(adapted) and not modapt.state_of(adapted).unloaded  # the caller's model is untouched
    feeds = tiny_inputs(batch=2, seq=6, padded=False)
    ort = OrtModel(out)
    full = {"input_ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"],
            "position_ids": torch.arange(6).expand(2, 6),
            **{f"past_key_values.{i}.{kv}": torch.zeros(2, 2, 0, 16) for i in range(2) for kv in ("key", "value")}}
    got = ort.run_torch(full)["logits"]
    with torch.no_grad():
        want = adapted(**feeds).logits
        plain = base(**feeds).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # the adapter is in the weights of the graph


# --- other tasks and families -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_cls(registry, tmp_path_factory):
    model = _randomise_lora(modapt.apply(tiny_bert("sequence-classification", seed=1), LORA), seed=4)
    return (model, *_export(tmp_path_factory, model, "sequence-classification", "bert"))


def test_bert_sequence_classification(bert_cls):
    model, out, manifest = bert_cls
    assert [o["name"] for o in manifest["outputs"]] == ["logits"]
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    feeds = tiny_inputs(batch=3, seq=10)  # row 0 right-padded
    got = OrtModel(out, providers=["CPUExecutionProvider"]).run(feeds)["logits"]
    with torch.no_grad():
        want = model(**feeds).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_llama_feature_extraction(registry, tmp_path_factory):
    model = tiny_llama("feature-extraction", seed=2)
    out, manifest = _export(tmp_path_factory, model, "feature-extraction", "llama-fe")
    assert [o["name"] for o in manifest["outputs"]] == ["last_hidden_state"]
    feeds = tiny_inputs(batch=2, seq=7)
    got = OrtModel(out).run(feeds)["last_hidden_state"]
    with torch.no_grad():
        want = model(**feeds).last_hidden_state.numpy()
    real = feeds["attention_mask"].bool().numpy()
    assert got.shape == (2, 7, 64)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_gpt2_causal_lm_generation(registry, tmp_path_factory):
    model = _randomise_lora(modapt.apply(tiny_gpt2("causal-lm", seed=5), LORA), seed=6)
    out, manifest = _export(tmp_path_factory, model, "causal-lm", "gpt2")
    assert manifest["cache"]["kv_heads"] == 4 and manifest["cache"]["head_dim"] == 16
    ids = torch.tensor([[5, 17, 33, 9, 71], [0, 0, 12, 60, 7]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    got = greedy_generate(OrtModel(out), ids, mask, max_new_tokens=8, pad_token_id=0)
    assert got.tolist() == expected.tolist()


# --- failures -----------------------------------------------------------------------------------

class CorruptingPlugin:
    """A plugin whose ONNX patch changes one weight: the verification must catch it."""

    @staticmethod
    @modapt.hookimpl
    def modapt_patch_onnx(onnx_model, model, task):
        from onnx import numpy_helper

        init = max(onnx_model.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] += 1.0
        init.CopyFrom(numpy_helper.from_array(arr, init.name))


def test_failed_verification_leaves_no_model(tmp_path):
    reg = modapt.Registry(autoload=False)
    reg.register_plugin(modapt.lora, "lora", "modapt")
    reg.register_plugin(CorruptingPlugin, "corrupt", "test-corrupt")
    out = tmp_path / "bad"
    with pytest.raises(VerificationError, match="differs from PyTorch") as info:
        onnx_export.export_onnx(tiny_gpt2("feature-extraction", seed=0), out, "feature-extraction", registry=reg)
    assert not info.value.report["passed"] and info.value.report["max_abs_error"] > 1e-4
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor the hidden partial directory


def test_user_errors(tmp_path):
    model = tiny_llama("causal-lm")
    with pytest.raises(modapt.ModaptError, match="unknown export task 'lm'.*causal-lm"):
        onnx_export.export_onnx(model, tmp_path / "x", "lm")
    with pytest.raises(modapt.ModaptError, match="opset 23"):
        onnx_export.export_onnx(model, tmp_path / "x", "causal-lm", opset=23)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(modapt.ModaptError, match="not empty"):
        onnx_export.export_onnx(model, tmp_path / "full", "causal-lm")
    with pytest.raises(modapt.ModaptError, match="no ONNX model"):
        OrtModel(tmp_path)


def test_ort_model_checks_input_names(llama_lm):
    ort = OrtModel(llama_lm[1])
    assert ort.provider == "CPUExecutionProvider" and ort.task == "causal-lm"
    with pytest.raises(modapt.ModaptError, match="missing.*position_ids"):
        ort.run({"input_ids": np.ones((1, 2), np.int64), "attention_mask": np.ones((1, 2), np.int64)})


def test_io_binding_path_matches_host_path(llama_lm):
    """The binding path (what CUDA uses) on CPU tensors, including an empty past and an int32
    input that must be converted, gives the host path's outputs; DLPack hands them to torch."""
    from modapt_export.ort_model import _ortvalue_to_torch

    ort = OrtModel(llama_lm[1])
    ids = tiny_inputs(batch=2, seq=5, padded=False)["input_ids"]
    feeds = {"input_ids": ids.to(torch.int32), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "position_ids": torch.arange(5).expand(2, 5),
             **{f"past_key_values.{i}.{kv}": torch.zeros(2, 2, 0, 16) for i in range(2) for kv in ("key", "value")}}
    io = ort.bind(feeds)
    ort.run_binding(io)
    bound = {n: _ortvalue_to_torch(v) for n, v in zip(ort.output_names, io.get_outputs())}
    host = ort.run(feeds)
    assert set(bound) == set(host)
    for name, value in host.items():
        np.testing.assert_array_equal(bound[name].numpy(), value)


# --- the command line ---------------------------------------------------------------------------

def test_cli_exports_base_plus_adapter(registry, tmp_path, capsys):
    from modapt.cli import main

    base = tiny_bert("feature-extraction", seed=7)
    base.save_pretrained(tmp_path / "base")
    adapted = _randomise_lora(modapt.apply(tiny_bert("feature-extraction", seed=7), LORA), seed=8)
    modapt.save(adapted, tmp_path / "adapter")
    registry.register_plugin(__import__("modapt_export.plugin", fromlist=["plugin"]), "export", "modapt-export")
    try:
        code = main(["export", "onnx", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "out"), "--task", "feature-extraction"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "verified on CPUExecutionProvider" in captured.out
        code = main(["export", "onnx", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"),
                     "--task", "causal-lm"])
        assert code == 1 and "not a transformers checkpoint" in capsys.readouterr().err
    finally:
        registry.unregister_plugin("export")
    feeds = tiny_inputs(batch=2, seq=6)
    got = OrtModel(tmp_path / "out").run(feeds)["last_hidden_state"]
    with torch.no_grad():
        want = adapted(**feeds).last_hidden_state.numpy()
    real = feeds["attention_mask"].bool().numpy()
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_merged_reparam_dora_has_base_node_count(llama_lm, tmp_path):
    """The reparam family (DoRA: magnitude × normalised direction) folds into plain weights too."""
    dora = pytest.importorskip("modapt_dora.plugin")
    reg = modapt.Registry(autoload=False)
    reg.register_plugin(modapt.lora, "lora", "modapt")
    reg.register_plugin(dora, "dora", "modapt-dora")
    with modapt.use_registry(reg):
        recipe = {"adapter": [{"method": "dora", "targets": ["q_proj", "v_proj", "down_proj"],
                               "update": {"method": "lora", "r": 4}}]}
        model = modapt.apply(tiny_llama("causal-lm", seed=0), recipe)
        gen = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for p in modapt.trainable_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        manifest = onnx_export.export_onnx(model, tmp_path / "dora", "causal-lm", registry=reg)
    assert manifest["verification"]["max_abs_error"] <= 1e-4
    assert manifest["nodes"] == llama_lm[2]["nodes"]
    ids = tiny_inputs(batch=1, seq=6, padded=False)["input_ids"]
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(6)[None],
             **{f"past_key_values.{i}.{kv}": torch.zeros(1, 2, 0, 16) for i in range(2) for kv in ("key", "value")}}
    got = OrtModel(tmp_path / "dora").run_torch(feeds)["logits"]
    with torch.no_grad():
        plain = llama_lm[0](input_ids=ids).logits
    assert (got - plain).abs().max() > 1e-2
