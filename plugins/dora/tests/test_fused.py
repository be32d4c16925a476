"""The fused LoRA path (one autograd node per layer) equals the general path it replaces.

The general path (base layer + LoRA update + ``rescale``) is the one checked against PEFT
with dropout; here both run on the same weights and inputs, with the fused path switched off
on one copy, in float32, in a bfloat16 model with float32 adapters, and under CPU autocast.
"""

from __future__ import annotations

import copy

import modapt
import modapt.lora
import modapt_dora.fused
import modapt_dora.plugin
import pytest
import torch
from modapt.testing import tiny_gpt2, tiny_inputs, tiny_llama
from modapt.testing.conformance import model_output, perturb


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_dora.plugin, name="dora", distribution="modapt-dora")
    return modapt_registry


def pair(factory, targets, registry):
    recipe = {"adapter": [{"method": "dora", "targets": targets, "update": {"method": "lora", "r": 4, "lora_alpha": 8.0}}]}
    fused = modapt.apply(factory(task="causal-lm"), recipe, registry=registry)
    perturb(fused, seed=5, scale=0.3)
    general = copy.deepcopy(fused)
    for host in modapt.state_of(general).layers.values():
        host.reparam._fusable = False
    return fused, general


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def run(model, precision):
    """(output, gradients) of one training forward/backward, in ``precision``."""
    model.train()
    if precision == "bf16":  # bf16 activations into the bf16 base layers, the adapter in float32
        model.to(torch.bfloat16)
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()
    torch.manual_seed(0)  # the model's own dropouts draw the same masks on every copy
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        out = model_output(model, tiny_inputs())
    out.float().pow(2).mean().backward()
    return out.detach().float(), grads(model)


def rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_equals_general_path(family, precision, registry, monkeypatch):
    """float32: equal to rounding. bf16 / autocast: the fused path is no further from the
    float32 result than the general path is (both round differently, neither is the reference)."""
    factory, targets = {"llama": (tiny_llama, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
                        "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])}[family]
    fused, general = pair(factory, targets, registry)
    reference = copy.deepcopy(general)
    calls = []
    original = modapt_dora.fused.DoraLora.apply
    monkeypatch.setattr(modapt_dora.fused.DoraLora, "apply", lambda *a: calls.append(1) or original(*a))
    y_f, g_f = run(fused, precision)
    assert len(calls) == len(modapt.state_of(fused).layers)  # the fused path ran on every layer, once
    y_g, g_g = run(general, precision)
    y_r, g_r = run(reference, "fp32")
    assert g_f.keys() == g_g.keys() == g_r.keys()
    if precision == "fp32":
        assert rel(y_f, y_g) < 1e-5
        for name in g_g:
            assert rel(g_f[name], g_g[name]) < 1e-4, name
        return
    assert rel(y_f, y_r) <= 1.5 * rel(y_g, y_r) + 1e-3
    for name in g_g:
        assert rel(g_f[name], g_r[name]) <= 1.5 * rel(g_g[name], g_r[name]) + 1e-2, name


def test_an_update_declaring_fused_low_rank_is_fused(registry):
    """FLoRA (no list names it) declares fused_low_rank: DoRA over flora is one node, equal to the
    general path in output and gradients (float32)."""
    flora = pytest.importorskip("modapt_flora.plugin")
    registry.register_plugin(flora, name="flora", distribution="modapt-flora")
    recipe = {"adapter": [{"method": "dora", "targets": ["q_proj", "down_proj"],
                           "update": {"method": "flora", "r": 4, "lora_alpha": 8.0}}]}
    fused = modapt.apply(tiny_llama(task="causal-lm"), recipe, registry=registry)
    perturb(fused, seed=5, scale=0.3)
    general = copy.deepcopy(fused)
    for host in modapt.state_of(general).layers.values():
        host.reparam._fusable = False
    layer = fused.model.layers[0].self_attn.q_proj
    assert type(layer(torch.randn(2, 64)).grad_fn).__name__ == "DoraLoraBackward"
    out_f, grad_f = run(fused, "fp32")
    out_g, grad_g = run(general, "fp32")
    assert rel(out_f, out_g) < 1e-5
    for name in grad_g:
        assert rel(grad_f[name], grad_g[name]) < 1e-4, name
