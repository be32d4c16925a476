"""MAP's forward and merged weight against the definition: flatten, normalise, combine.

The reference is written out in float64 from the raw parameters (W0 as the layer stores it,
ΔW = s·B·A for LoRA or D for the dense update), independently of the plugin's code paths.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import modapt
from modapt.testing import LayerHolder

OUT, IN, VOCAB = 10, 12, 20


def make(kind: str, seed: int = 0) -> LayerHolder:
    """A model holding one layer with canonical weight [OUT, IN] ([OUT, VOCAB] for the embedding)."""
    gen = torch.Generator().manual_seed(seed)
    layer = {"linear": lambda: nn.Linear(IN, OUT), "conv1d": lambda: Conv1D(OUT, IN),
             "embedding": lambda: nn.Embedding(VOCAB, OUT)}[kind]()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return LayerHolder(layer)


def inputs(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if kind == "embedding":
        return torch.randint(0, VOCAB, (2, 5), generator=gen)
    return torch.randn(2, 5, IN, generator=gen)


UPDATES = {
    "lora": {"method": "lora", "r": 4, "lora_alpha": 16.0},
    "dense": {"method": "dense"},
}


def recipe(update: str, **options) -> dict:
    return {"adapter": [{"method": "map", "targets": ["layer"], **options, "update": UPDATES[update]}]}


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter parameter (α, β and the update's) to arbitrary non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(modapt.trainable_parameters(model).items()):
        p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.dim() else 3.0))


def reference(model: LayerHolder, kind: str, update: str, x: torch.Tensor):
    """(W* [out, in], y) in float64, straight from the definition."""
    host = model.layer
    base = host.base_layer
    w0 = base.weight.double()
    w0 = w0 if kind == "linear" else w0.t()  # Conv1D stores [in, out], an embedding [num, dim]
    if update == "lora":
        delta = (16.0 / 4) * host.lora_B.weight.double() @ host.lora_A.weight.double()
    else:
        delta = host.dense_delta.double()
    alpha, beta = host.map_alpha.double(), host.map_beta.double()
    w_star = alpha * w0 / w0.flatten().norm() + beta * delta / delta.flatten().norm()
    if kind == "embedding":
        y = w_star.t()[x]
    else:
        y = x.double() @ w_star.t() + base.bias.double()
    return w_star, y


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("update", ["lora", "dense"])
def test_forward_and_merged_weight_follow_the_definition(registry, kind, update):
    model = modapt.apply(make(kind), recipe(update), registry=registry)
    randomise(model)
    x = inputs(kind)
    w_star, y_ref = reference(model, kind, update, x)
    with torch.no_grad():
        y = model(x)
        merged = model.layer.merged_weight()
    assert y.dtype == torch.float32 and merged.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(merged, w_star) < 1e-6
    # and the merged layer computes the same function
    modapt.merge(model, unload=True)
    with torch.no_grad():
        assert rel_err(model(x), y_ref) < 1e-6


@pytest.mark.parametrize("update", ["lora", "dense"])
def test_the_update_scaling_cancels(registry, update):
    """lora_alpha/r (or any scale of ΔW) leaves W* unchanged: only ΔW's direction enters."""
    model = modapt.apply(make("linear"), recipe(update), registry=registry)
    randomise(model)
    before = model.layer.merged_weight()
    with torch.no_grad():
        for name in model.layer.reparam.update_parameter_names:
            model.layer.get_parameter(name).mul_(7.0)
    torch.testing.assert_close(model.layer.merged_weight(), before, rtol=1e-6, atol=1e-7)


def test_w0_norm_is_a_float32_buffer_outside_the_adapter_file(registry):
    base = make("linear")
    model = modapt.apply(make("linear").to(torch.bfloat16), recipe("lora"), registry=registry)
    host = model.layer
    assert host.map_w0_norm.dtype == torch.float32 and host.map_w0_norm.dim() == 0
    torch.testing.assert_close(host.map_w0_norm, base.layer.weight.bfloat16().float().norm())
    assert host.map_alpha.dtype == torch.float32
    assert not any("map_w0_norm" in k for k in modapt.adapter_state_dict(model))
    assert "layer.map_w0_norm" not in model.state_dict()
