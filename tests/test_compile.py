"""modapt-adapted models train under ``torch.compile``: compiled loss and gradients equal eager.

LoRA on a tiny LLaMA is compiled with inductor (the default backend, what users get) and must
trace as one graph with no break, through the one-node ``LoraLinear`` (dynamo traces an
``autograd.Function``'s forward and backward; export keeps the module path). LoMAP, DoRA and
LoRA+LMAM are compiled with ``aot_eager`` (dynamo and AOT autograd, where graph breaks and
traced side effects live, without inductor's C++ compile); their inductor runs are marked slow.
The reference is always the same model run eagerly in float32, with perturbed adapter weights
(B = 0 at init would hide the adapter's own terms).
"""

from __future__ import annotations

import modapt
import modapt.lora
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama
from modapt.testing.conformance import perturb
from torch import nn

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"method": "lora", "r": 4, "lora_alpha": 8.0}
RECIPES = {
    "lora": {"adapter": [{**LORA, "targets": LINEAR}]},
    "lomap": {"adapter": [{"method": "map", "targets": LINEAR, "update": LORA}]},
    "dora": {"adapter": [{"method": "dora", "targets": LINEAR, "update": LORA}]},
    "lora+lmam": {"adapter": [{**LORA, "targets": LINEAR}, {"method": "lmam", "r": 2, "n": 8}]},
}
PLUGINS = {"lomap": ["map"], "dora": ["dora"], "lora+lmam": ["lmam"]}


@pytest.fixture(autouse=True)
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    return modapt_registry


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no cached graphs (they hold the models)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapted_llama(recipe_name: str, registry) -> nn.Module:
    for plugin in PLUGINS.get(recipe_name, []):
        module = pytest.importorskip(f"modapt_{plugin}.plugin")
        registry.register_plugin(module, name=plugin, distribution=f"modapt-{plugin}")
    model = tiny_llama(num_hidden_layers=1, attn_implementation="sdpa")  # compile time grows with depth
    torch.manual_seed(0)  # A's init: two calls build the same adapter
    modapt.apply(model, RECIPES[recipe_name])
    perturb(model)
    model.train()
    return model


def loss_and_grads(model: nn.Module, run: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward through ``run`` (the model or its compiled wrapper) and backward;
    the loss and every trainable parameter's gradient."""
    model.zero_grad(set_to_none=True)
    ids = tiny_inputs(batch=2, seq=12)["input_ids"]
    loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in modapt.trainable_parameters(model).items()}


def assert_compiled_equals_eager(model: nn.Module, **compile_args) -> None:
    eager_loss, eager_grads = loss_and_grads(model, model)
    compiled_loss, compiled_grads = loss_and_grads(model, torch.compile(model, **compile_args))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, name  # a gradient that is zero eagerly would compare trivially
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_compiles_with_inductor_and_matches_eager(registry):
    model = adapted_llama("lora", registry)
    torch._dynamo.utils.counters.clear()
    assert_compiled_equals_eager(model)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_lora_traces_as_one_graph_through_the_one_node_layer(registry):
    """No graph break; every adapted layer is one ``LoraLinear`` node in the dynamo graph (7
    linear kinds) rather than the module path's separate base, A, B, scale and sum."""
    model = adapted_llama("lora", registry)
    ids = tiny_inputs(batch=2, seq=12)["input_ids"]
    explained = torch._dynamo.explain(lambda: model(input_ids=ids, labels=ids).loss)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    graph = explained.graphs[0].graph
    fused = [n for n in graph.nodes if n.op == "call_function" and "autograd_function_apply" in str(n.target)]
    assert len(fused) == 7 * model.config.num_hidden_layers


def test_export_keeps_the_module_path():
    """torch.export (and so the ONNX exporter) must see plain ops, not the custom autograd node."""
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 6))
    modapt.apply(model, {"adapter": [{**LORA, "targets": ["proj"]}]})
    model.eval()
    program = torch.export.export(model, (torch.randn(3, 8),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in targets
    assert not any("autograd_function" in t for t in targets), targets


@pytest.mark.parametrize("recipe_name", ["lomap", "dora", "lora+lmam"])
def test_other_methods_compile_and_match_eager(recipe_name, registry):
    assert_compiled_equals_eager(adapted_llama(recipe_name, registry), backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["lomap", "dora", "lora+lmam"])
def test_other_methods_compile_with_inductor(recipe_name, registry):
    assert_compiled_equals_eager(adapted_llama(recipe_name, registry))


def test_compiled_training_steps_follow_eager_ones(registry):
    """Three AdamW steps through the compiled model move the weights as three eager steps do
    (the optimizer stays eager; the compiled graph must see the updated parameters each step)."""
    models = [adapted_llama("lora", registry) for _ in range(2)]
    runs = [models[0], torch.compile(models[1], backend="aot_eager")]
    optimizers = [torch.optim.AdamW(modapt.trainable_parameters(m).values(), lr=1e-2) for m in models]
    losses = [[], []]
    for _ in range(3):
        for i in range(2):
            loss, _ = loss_and_grads(models[i], runs[i])
            optimizers[i].step()
            losses[i].append(loss)
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=1e-5, atol=1e-6)
    assert losses[0][2] < losses[0][0]  # the steps did train
    eager, compiled = (modapt.trainable_parameters(m) for m in models)
    for name, param in eager.items():
        torch.testing.assert_close(compiled[name], param, rtol=1e-5, atol=1e-6, msg=name)
