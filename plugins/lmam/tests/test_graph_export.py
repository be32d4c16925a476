"""The exported causal-LM graph of LMAM (the KV-cache contract of ``modapt_export``): how many
nodes LMAM costs per adapted layer, counted on the written model, and ONNX Runtime equal to
PyTorch where the block is awkward: sequences shorter than n, left padding, cached decode steps
inside and past the map, a multi-token step that crosses n."""

from __future__ import annotations

import collections

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx_export = pytest.importorskip("modapt_export.onnx_export")
from modapt.testing import tiny_llama
from modapt_export.onnx_io import CausalLMWithCache, make_inputs
from modapt_export.ort_model import OrtModel

N = 6
#: LMAM's own nodes per adapted layer on the graph path: the gathered map rows, the keep
#: mask's product, V's block, their product and its add (modapt_lmam.graph_term)
TERM_NODES = 5
#: nodes per adapted attention layer minus the base's (measured 48 - 55 on tiny LLaMA)
K = -7
#: the shared indices, once per graph (measured 14)
SHARED = 14
#: outside the attention scopes: LMAM's export mask (eager_mask, float) against SDPA's (bool)
OUTSIDE = 2  # measured


def _layers_of(proto) -> collections.Counter:
    """Nodes per ``model.layers.{i}.self_attn`` scope (the exporter's name-scope metadata)."""
    counts = collections.Counter()
    for node in proto.graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        for i in range(8):
            if f"layers.{i}.self_attn'" in scopes or f"layers.{i}.self_attn\"" in scopes:
                counts[i] += 1
    return counts


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    import modapt.lora
    import modapt_lmam.plugin

    reg = modapt.Registry(autoload=False)
    reg.register_plugin(modapt.lora, "lora", "modapt")
    reg.register_plugin(modapt_lmam.plugin, "lmam", "modapt-lmam")
    root = tmp_path_factory.mktemp("graph")
    with modapt.use_registry(reg):
        base = tiny_llama("causal-lm", seed=21, attn_implementation="sdpa")
        onnx_export.export_onnx(base, root / "base", "causal-lm", registry=reg)
        model = modapt.apply(tiny_llama("causal-lm", seed=21, attn_implementation="sdpa"),
                             {"adapter": [{"method": "lmam", "n": N, "r": 2, "init": "random", "scale": 0.5}]})
        manifest = onnx_export.export_onnx(model, root / "lmam", "causal-lm", registry=reg)
    return model, root, manifest


def test_graph_path_is_taken_and_verifies(exports):
    model, root, manifest = exports
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_error"] <= 1e-4
    graph = onnx.load(str(root / "lmam" / "model.onnx")).graph
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    constants = {init.name for init in graph.initializer if list(init.dims) == [heads, N + 1, N]}
    assert len(constants) == layers  # one constant per layer, gathered once...
    assert sum(node.op_type == "Gather" and node.input[0] in constants for node in graph.node) == layers
    # ...and no [h_s, n, n] map of the general term
    assert not any(list(init.dims) == [heads, N, N] for init in graph.initializer)
    # export restores the caller's model: the export's constant is gone again
    assert not any(name.endswith("lmam_graph_map") for name, _ in model.named_buffers())


def test_nodes_per_adapted_layer(exports):
    """K: an adapted layer's attention, LMAM term included, against the base's SDPA attention,
    counted in each ``self_attn`` scope of the written models. The graph path writes SDPA out
    in 12 nodes fewer than torch's decomposition (which also turns the bool mask into a float
    one per layer and guards NaN rows) and adds the term's 5, so K is negative; what LMAM adds
    once is the indices shared by all layers, traced in the first layer's scope. A change that
    adds a node per layer fails here."""
    model, root, _ = exports
    base = onnx.load(str(root / "base" / "model.onnx"), load_external_data=False)
    lmam = onnx.load(str(root / "lmam" / "model.onnx"), load_external_data=False)
    layers = model.config.num_hidden_layers
    per_base, per_lmam = _layers_of(base), _layers_of(lmam)
    assert len(per_lmam) == layers == len(per_base) >= 2
    for i in range(1, layers):
        assert per_lmam[i] - per_base[i] <= K, (i, per_lmam[i], per_base[i])
    shared = (per_lmam[0] - per_base[0]) - (per_lmam[1] - per_base[1])
    assert shared <= SHARED, shared
    total = len(lmam.graph.node) - len(base.graph.node)
    assert total <= K * layers + SHARED + OUTSIDE, (total, len(lmam.graph.node), len(base.graph.node))


CASES = [
    # (batch, seq, past, left padding of row 0 over the total length)
    (1, 3, 0, 0),   # shorter than n
    (2, 4, 0, 2),   # shorter than n, left padded
    (2, 9, 0, 3),   # longer than n, left padded
    (1, 1, 3, 0),   # decode inside the map
    (2, 1, 4, 2),   # decode inside the map, left-padded past
    (1, 1, 9, 0),   # decode past the map
    (2, 3, 4, 1),   # a multi-token step that crosses n
]


@pytest.mark.parametrize("batch, seq, past, pad", CASES)
def test_ort_equals_pytorch(exports, batch, seq, past, pad):
    model, root, _ = exports
    feeds = make_inputs("causal-lm", model.config, batch, seq, past=past, padding="none", seed=batch * 100 + seq + past)
    if pad:
        feeds["attention_mask"][0, :pad] = 0
        feeds["position_ids"][0] = (feeds["attention_mask"][0].cumsum(-1) - 1).clamp(min=0)[past:]
    got = OrtModel(root / "lmam").run_torch(feeds)
    with torch.no_grad():
        want = CausalLMWithCache(model)(*feeds.values())
    real = feeds["attention_mask"][:, past:].bool()
    diff = (got["logits"] - want[0]).abs()[real]
    assert diff.max() <= 1e-4, diff.max()
    # the cache of the next layer at real slots (a padded slot's query row attends to nothing)
    slots = feeds["attention_mask"].bool()
    torch.testing.assert_close(got["present.1.value"].transpose(1, 2)[slots], want[4].transpose(1, 2)[slots],
                               atol=1e-5, rtol=0)
