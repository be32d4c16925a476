"""The one-node LoRA layer (modapt.lora_linear) against the formula written out, and when it is taken."""

from __future__ import annotations

import modapt
import modapt.lora
import pytest
import torch
from modapt.lora_linear import LoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D


def adapted(base: nn.Module, r=4, alpha=8.0, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("proj", base)
    modapt.apply(model, {"adapter": [{"method": "lora", "r": r, "lora_alpha": alpha, "dropout": dropout,
                                      "targets": ["proj"]}]})
    with torch.no_grad():  # B = 0 at init would hide B's role in the output
        model.proj.lora_B.weight.normal_()
    return model


def reference(x, w0, bias, a, b, s):
    """y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ, in float64."""
    y = x.double() @ w0.double().t() + s * (x.double() @ a.double().t()) @ b.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "conv1d"])
def test_output_and_gradients_match_the_formula(kind):
    base = {"linear": nn.Linear(12, 10), "linear-nobias": nn.Linear(12, 10, bias=False),
            "conv1d": Conv1D(10, 12)}[kind]
    model = adapted(base)
    host = model.proj
    w0 = host.base_layer.weight if kind != "conv1d" else host.base_layer.weight.t()
    bias = host.base_layer.bias
    a, b = host.lora_A.weight, host.lora_B.weight
    x = torch.randn(3, 5, 12, requires_grad=True)
    calls = []
    original = LoraLinear.forward
    LoraLinear.forward = staticmethod(lambda *args: calls.append(1) or original(*args))
    try:
        y = model(x)
    finally:
        LoraLinear.forward = staticmethod(original)
    assert calls, "the one-node path was not taken for a plain layer"
    xr = x.detach().double().requires_grad_()
    ar, br = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    expected = reference(xr, w0.detach(), None if bias is None else bias.detach(), ar, br, 2.0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), ar.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), br.grad, rtol=1e-5, atol=1e-5)
    assert host.base_layer.weight.grad is None


def module_path(model, fn):
    """Run ``fn`` with the one-node path switched off (the module path of the additive reparam)."""
    original = modapt.lora.Lora.layer_output
    modapt.lora.Lora.layer_output = lambda self, *a, **k: None
    try:
        return fn()
    finally:
        modapt.lora.Lora.layer_output = original


def test_autocast_is_as_accurate_as_the_module_path():
    """bf16 autocast, float32 weights: output and gradients within bf16 rounding of the float64
    formula, and no further from it than the module path (norm of the error)."""
    model = adapted(nn.Linear(32, 24))
    host = model.proj
    x = torch.randn(16, 32, requires_grad=True)
    g = torch.randn(16, 24)

    def run():
        x.grad = None
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().backward(g)
        return [y.float(), x.grad.clone(), host.lora_A.weight.grad.clone(), host.lora_B.weight.grad.clone()]

    fast, slow = run(), module_path(model, run)
    assert fast[0].dtype == torch.float32 and host.lora_A.weight.grad.dtype == torch.float32
    xr = x.detach().double().requires_grad_()
    ar = host.lora_A.weight.detach().double().requires_grad_()
    br = host.lora_B.weight.detach().double().requires_grad_()
    y = reference(xr, host.base_layer.weight.detach(), host.base_layer.bias.detach(), ar, br, 2.0)
    y.backward(g.double())
    exact = [y, xr.grad, ar.grad, br.grad]
    for got, old, want in zip(fast, slow, exact):
        err, old_err = (got.double() - want).norm() / want.norm(), (old.double() - want).norm() / want.norm()
        assert err < 2e-2, err
        assert err <= 1.25 * old_err + 1e-3, (err, old_err)


def test_dropout_hooks_and_mixed_dtypes_take_the_module_path():
    x = torch.randn(4, 12)
    with_dropout = adapted(nn.Linear(12, 10), dropout=0.5)
    assert with_dropout.proj.update.layer_output(x, with_dropout.proj.base_layer) is None  # training mode
    with_dropout.eval()
    assert with_dropout.proj.update.layer_output(x, with_dropout.proj.base_layer) is not None

    hooked = adapted(nn.Linear(12, 10))
    seen = []
    hooked.proj.base_layer.register_forward_hook(lambda m, i, o: seen.append(1))
    hooked(x)
    assert seen == [1]  # the base layer's own hooks (accelerate offload, ...) still run

    mixed = adapted(nn.Linear(12, 10))
    mixed.proj.base_layer.to(torch.bfloat16)  # float32 adapter on a bf16 base, no autocast
    assert mixed.proj.update.layer_output(x.bfloat16(), mixed.proj.base_layer) is None
    y = mixed(x.bfloat16())
    assert y.dtype == torch.bfloat16

    trainable_base = adapted(nn.Linear(12, 10))
    trainable_base.proj.base_layer.weight.requires_grad_(True)
    assert trainable_base.proj.update.layer_output(x, trainable_base.proj.base_layer) is None


def test_merge_equals_the_one_node_forward():
    model = adapted(nn.Linear(12, 10))
    x = torch.randn(6, 12)
    with torch.no_grad():
        live = model(x)
        modapt.merge(model, unload=False)
        merged = model(x)
    torch.testing.assert_close(merged, live, rtol=1e-5, atol=1e-5)


def test_called_plainly():
    """Only a plain Linear/Conv1D without hooks may be computed by hand inside a fused node."""
    from modapt import layers

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    hooked = nn.Linear(4, 3)
    hooked.register_forward_pre_hook(lambda m, i: None)
    assert layers.called_plainly(nn.Linear(4, 3)) and layers.called_plainly(Conv1D(3, 4))
    assert not layers.called_plainly(Scaled(4, 3))
    assert not layers.called_plainly(hooked)
    assert not layers.called_plainly(nn.Embedding(5, 3))
    model = adapted(Scaled(12, 10))  # the subclass's own forward runs: its output is doubled
    x = torch.randn(2, 12)
    host = model.proj
    expected = 2 * host.base_layer.__class__.__mro__[1].forward(host.base_layer, x)
    expected = expected + 2.0 * x @ host.lora_A.weight.t() @ host.lora_B.weight.t()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
