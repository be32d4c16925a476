"""The one-node MAP over a factored update against the formula written out with explicit matrices.

The reference builds, in float64 from the raw parameters, W0 (as the layer stores it), ΔW = s·B·A
(LoRA) or B·diag(Λ)·A·c (AdaLoRA) and W* = α·W0/‖W0‖_F + β·ΔW/‖ΔW‖_F, then y = x W*ᵀ + bias,
and takes its gradients with autograd. The model under test must have taken the fused node
(its output's ``grad_fn`` is ``MapFactoredBackward``), except where a test asks for the fallback.
"""

from __future__ import annotations

import modapt
import pytest
import torch
from modapt.testing import LayerHolder, memory
from modapt_map.factored import MapFactored, compute_dtype
from torch import nn
from transformers.pytorch_utils import Conv1D

OUT, IN = 10, 12
UPDATES = {
    "lora": {"method": "lora", "r": 4, "lora_alpha": 16.0},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "lora_alpha": 16.0, "total_step": 10},
}


@pytest.fixture
def reg(registry):
    adalora = pytest.importorskip("modapt_adalora.plugin")
    registry.register_plugin(adalora, name="adalora", distribution="modapt-adalora")
    return registry


def make(kind: str, bias: bool = True) -> LayerHolder:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(IN, OUT, bias=bias) if kind == "linear" else Conv1D(OUT, IN)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return LayerHolder(layer)


def adapted(reg, kind: str, update: str, *, dtype=torch.float32, bias=True, **update_options) -> LayerHolder:
    model = make(kind, bias).to(dtype)
    recipe = {"adapter": [{"method": "map", "targets": ["layer"], "update": {**UPDATES[update], **update_options}}]}
    modapt.apply(model, recipe, registry=reg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every adapter parameter moved to arbitrary non-zero values
        for _, p in sorted(modapt.trainable_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.dim() else 3.0))
    return model


def update_params(host, update: str) -> dict[str, torch.Tensor]:
    if update == "lora":
        return {"A": host.lora_A.weight, "B": host.lora_B.weight}
    return {"A": host.lora_A, "E": host.lora_E, "B": host.lora_B}


def reference(model: LayerHolder, kind: str, update: str, x: torch.Tensor, g: torch.Tensor):
    """(y, {name: gradient}) in float64 from the definition, for output gradient ``g``."""
    host = model.layer
    base = host.base_layer
    leaves = {"x": x.detach().double().requires_grad_(),
              "alpha": host.map_alpha.detach().double().requires_grad_(),
              "beta": host.map_beta.detach().double().requires_grad_()}
    leaves.update({k: v.detach().double().requires_grad_() for k, v in update_params(host, update).items()})
    w0 = base.weight.detach().double()
    w0 = w0 if kind == "linear" else w0.t()  # Conv1D stores [in, out]
    if update == "lora":
        delta = (16.0 / 4) * leaves["B"] @ leaves["A"]
    else:
        delta = leaves["B"] @ (leaves["A"] * leaves["E"]) * (16.0 / (4 + 1e-5))
    w_star = leaves["alpha"] * w0 / w0.norm() + leaves["beta"] * delta / delta.norm()
    y = leaves["x"] @ w_star.t()
    if base.bias is not None:
        y = y + base.bias.detach().double()
    grads = torch.autograd.grad(y, list(leaves.values()), g.double())
    return y.detach(), dict(zip(leaves, grads))


def ours(model: LayerHolder, update: str, x: torch.Tensor, g: torch.Tensor):
    host = model.layer
    x = x.detach().clone().requires_grad_()
    y = model(x)
    assert type(y.grad_fn).__name__ == "MapFactoredBackward", type(y.grad_fn)
    y.backward(g)
    grads = {"x": x.grad, "alpha": host.map_alpha.grad, "beta": host.map_beta.grad}
    grads.update({k: v.grad for k, v in update_params(host, update).items()})
    return y.detach(), grads


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def inputs(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, IN, generator=gen).to(dtype), torch.randn(2, 5, OUT, generator=gen).to(dtype)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("update", ["lora", "adalora"])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_follow_the_formula_fp32(reg, kind, update, bias):
    if kind == "conv1d" and not bias:
        pytest.skip("Conv1D always has a bias")
    model = adapted(reg, kind, update, bias=bias)
    x, g = inputs()
    y, grads = ours(model, update, x, g)
    y_ref, want = reference(model, kind, update, x, g)
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-6
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32, name
        assert rel_err(grad, want[name]) < 1e-5, name


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("update", ["lora", "adalora"])
def test_bf16_base_with_float32_adapters(reg, kind, update):
    """bf16 products with fp32 accumulation: the error is bf16 rounding (2⁻⁸), and the fp32
    parameters get fp32 gradients."""
    model = adapted(reg, kind, update, dtype=torch.bfloat16)
    host = model.layer
    assert host.map_alpha.dtype == torch.float32 and update_params(host, update)["A"].dtype == torch.float32
    x, g = inputs(torch.bfloat16)
    y, grads = ours(model, update, x, g)
    y_ref, want = reference(model, kind, update, x, g)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 1e-2
    for name, grad in grads.items():
        assert grad.dtype == (torch.bfloat16 if name == "x" else torch.float32), name
        assert rel_err(grad, want[name]) < 2e-2, name


@pytest.mark.parametrize("device_has_it", [True, False])
def test_float32_output_gemms_and_their_fallback(reg, monkeypatch, device_has_it):
    """The factors' gradients gᵀh and (gL)ᵀx on a bf16 base come from GEMMs with float32 output where
    the device has them (CUDA; emulated here by a ``torch.mm`` that takes ``out_dtype``), else from
    the product and a cast (a CPU raises, the path is remembered): both give the formula's gradients."""
    from modapt import float32_gemm
    from modapt.testing.float32_gemm import emulate_float32_mm

    calls = emulate_float32_mm(monkeypatch, device_has_it)
    model = adapted(reg, "linear", "lora", dtype=torch.bfloat16)
    x, g = inputs(torch.bfloat16)
    _, grads = ours(model, "lora", x, g)
    _, want = reference(model, "linear", "lora", x, g)
    assert calls == [torch.float32] * (2 if device_has_it else 1)  # after one refusal it is not asked again
    assert float32_gemm.available("cpu") is device_has_it
    for name in ("A", "B", "beta"):
        assert rel_err(grads[name], want[name]) < 2e-2, name


def test_autocast_computes_in_its_dtype(reg):
    """fp32 model under bf16 autocast: fused, bf16 output, fp32 input gradient; close to the formula."""
    model = adapted(reg, "linear", "lora")
    x, g = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x, model.layer, model.layer.update) == torch.bfloat16
        y, grads = ours(model, "lora", x, g)
    y_ref, want = reference(model, "linear", "lora", x, g.bfloat16().float())
    assert y.dtype == torch.bfloat16 and grads["x"].dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-2
    for name, grad in grads.items():
        assert rel_err(grad, want[name]) < 2e-2, name


def test_backward_inside_autocast_is_the_backward_outside(reg):
    """The node's backward keeps its k×k work in the factors' dtype wherever backward is called: inside the
    autocast region (the CPU runs backward in the calling thread, under its autocast state) it gives
    the gradients it gives outside, bit for bit."""
    grads = []
    for inside in (False, True):
        model = adapted(reg, "linear", "lora")
        x, g = inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
            if inside:
                y.backward(g.bfloat16())
        if not inside:
            y.backward(g.bfloat16())
        grads.append({k: p.grad.clone() for k, p in sorted(modapt.trainable_parameters(model).items())})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("update", ["lora", "adalora"])
def test_the_general_path_computes_the_same(reg, update, monkeypatch):
    """The fused node and the general path (update.forward + MapOutput) agree in fp32."""
    model = adapted(reg, "linear", update)
    x, g = inputs()
    fused, fused_grads = ours(model, update, x, g)
    for p in modapt.trainable_parameters(model).values():
        p.grad = None
    monkeypatch.setattr("modapt_map.reparam.compute_dtype", lambda *a: None)
    xx = x.clone().requires_grad_()
    y = model(xx)
    assert type(y.grad_fn).__name__ == "MapOutputBackward"
    y.backward(g)
    torch.testing.assert_close(y, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xx.grad, fused_grads["x"], rtol=1e-5, atol=1e-5)
    for name, p in update_params(model.layer, update).items():
        torch.testing.assert_close(p.grad, fused_grads[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("update", ["lora", "adalora"])
def test_dropout_falls_back_in_training_and_fuses_in_eval(reg, update):
    model = adapted(reg, "linear", update, dropout=0.5)
    x, g = inputs()
    model.train()
    assert compute_dtype(x, model.layer, model.layer.update) is None
    assert type(model(x.requires_grad_()).grad_fn).__name__ == "MapOutputBackward"
    model.eval()  # dropout inactive: the update is L R x, fused
    y, grads = ours(model, update, x, g)
    y_ref, want = reference(model, "linear", update, x, g)
    assert rel_err(y, y_ref) < 1e-6
    for name, grad in grads.items():
        assert rel_err(grad, want[name]) < 1e-5, name


@pytest.mark.parametrize("fused", [True, False])
def test_a_trainable_bias_gets_its_gradient(reg, fused, monkeypatch):
    """The base is frozen by modapt; a bias the user unfreezes still learns, on either path."""
    if not fused:
        monkeypatch.setattr("modapt_map.reparam.compute_dtype", lambda *a: None)
    model = adapted(reg, "conv1d", "lora")
    bias = model.layer.base_layer.bias.requires_grad_()
    x, g = inputs()
    y = model(x)
    assert (type(y.grad_fn).__name__ == "MapFactoredBackward") == fused
    y.backward(g)
    torch.testing.assert_close(bias.grad, g.sum(dim=(0, 1)))


def test_subclasses_embeddings_and_extra_arguments_keep_the_general_path(reg):
    from modapt.lora import Lora

    model = adapted(reg, "linear", "lora")
    host = model.layer
    x, _ = inputs()
    assert compute_dtype(x, host, host.update) == torch.float32
    host.update.__class__ = type("MyLora", (Lora,), {})  # fused_low_rank is not inherited
    assert compute_dtype(x, host, host.update) is None
    emb = LayerHolder(nn.Embedding(20, OUT))
    modapt.apply(emb, {"adapter": [{"method": "map", "targets": ["layer"], "update": UPDATES["lora"]}]}, registry=reg)
    assert compute_dtype(torch.randn(3, 20), emb.layer, emb.layer.update) is None


def test_identity_at_init_is_the_base_output_bit_for_bit(reg):
    for dtype in (torch.float32, torch.bfloat16):
        base = make("linear").to(dtype)
        x, _ = inputs(dtype)
        with torch.no_grad():
            want = base(x)
        recipe = {"adapter": [{"method": "map", "targets": ["layer"], "update": UPDATES["lora"]}]}
        modapt.apply(base, recipe, registry=reg)
        y = base(x)
        assert type(y.grad_fn).__name__ == "MapFactoredBackward"
        assert torch.equal(y.detach(), want), dtype


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e3])
def test_gradcheck_float64(bias, eps):
    """Every input's gradient, with ‖ΔW‖ above the floor eps and below it (eps = 1e3: b = β/eps)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, IN, generator=gen, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    b0 = torch.randn(OUT, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    left = torch.randn(OUT, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    right = torch.randn(3, IN, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(-1.4, dtype=torch.float64, requires_grad=True)
    w0_norm = w0.norm()

    def fn(x, left, right, alpha, beta, *bias_):
        return MapFactored.apply(x, w0, bias_[0] if bias_ else None, left, right, alpha, beta, w0_norm, eps,
                                 torch.float64)

    assert torch.autograd.gradcheck(fn, (x, left, right, alpha, beta) + ((b0,) if bias else ()))


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``model(x)``: each storage once, parameters left out."""
    return memory.saved_bytes(lambda: model(x), model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_what_lora_saves_plus_a_constant(reg, dtype):
    """LoMAP's saved memory minus LoRA's does not grow with the number of tokens (it is the k-wide
    factors and the norm's k×k graph); the general path's grows by ΔW x [tokens, out]."""
    def excess() -> list[int]:
        diffs = []
        for tokens in (8, 64):
            x = torch.randn(tokens, IN).to(dtype)
            counts = []
            for adapter in ("lora", "map"):
                model = make("linear").to(dtype)
                entry = ({**UPDATES["lora"], "targets": ["layer"]} if adapter == "lora" else
                         {"method": "map", "targets": ["layer"], "update": UPDATES["lora"]})
                modapt.apply(model, {"adapter": [entry]}, registry=reg)
                counts.append(saved_bytes(model, x))
            diffs.append(counts[1] - counts[0])
        return diffs

    small, large = excess()
    assert large <= small  # bf16: LoRA keeps x in float32, the node keeps the bf16 x: smaller
    assert small <= 4 * OUT * 4 * 4 + 1024  # a few k-wide [out, k] tensors and O(1)
    with modapt.fast_paths(map_one_node=False):
        small, large = excess()
    assert large - small >= (64 - 8) * OUT * (2 if dtype == torch.bfloat16 else 4)  # ΔW x [tokens, out]


def test_torch_compile_keeps_the_node_and_its_numbers(reg):
    model = adapted(reg, "linear", "lora")
    x, g = inputs()
    y, grads = ours(model, "lora", x, g)
    for p in modapt.trainable_parameters(model).values():
        p.grad = None
    xx = x.clone().requires_grad_()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y_c = compiled(xx)
    y_c.backward(g)
    torch.testing.assert_close(y_c, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xx.grad, grads["x"], rtol=1e-6, atol=1e-6)
    for name, p in update_params(model.layer, "lora").items():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-6, atol=1e-6)


def test_an_update_declaring_fused_low_rank_takes_the_one_node_path(reg):
    """FLoRA (another distribution, no list names it) declares the capability: map over flora is
    one node, equal to the general path (forward and gradients)."""
    flora = pytest.importorskip("modapt_flora.plugin")
    reg.register_plugin(flora, name="flora", distribution="modapt-flora")
    UPDATES["flora"] = {"method": "flora", "r": 4, "lora_alpha": 16.0}
    try:
        model = adapted(reg, "linear", "flora")
    finally:
        del UPDATES["flora"]
    x, _ = inputs()
    y = model(x)
    assert type(y.grad_fn).__name__ == "MapFactoredBackward"
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.autograd.grad(y.square().sum(), params)
    with modapt.fast_paths(map_one_node=False):
        y_ref = model(x)
        ref = torch.autograd.grad(y_ref.square().sum(), params)
    assert type(y_ref.grad_fn).__name__ != "MapFactoredBackward"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(fused, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
