"""The fused, recomputing training path against the dense formula x ↦ x (T(θ) − T(θ0))ᵀ and the einsum reference."""

import math

import modapt
import modapt_quanta.plugin
import pytest
import torch
from modapt_quanta.circuit import apply_circuit, circuit_matrix, init_gates, plan_circuit
from modapt_quanta.difference import Schedule, circuit_difference
from torch import nn

FACTORS = [([3, 2, 2], [3, 2, 2]), ([2, 3, 2], [4, 3, 2]), ([4, 3, 2], [2, 3, 2]), ([2, 2, 2, 2], [2, 2, 2, 2]),
           ([3, 2, 2, 2], [2, 2, 3, 2]), ([4, 3], [2, 5]), ([2, 3, 2, 2, 2], [3, 2, 2, 2, 2])]


def _dense_reference(circuit, theta, theta0, x):
    """y = x ΔWᵀ with ΔW = T(θ) − T(θ0) built as full matrices (einsum on the identity)."""
    return x @ (circuit_matrix(circuit, theta) - circuit_matrix(circuit, theta0)).t()


@pytest.mark.parametrize("in_dims,out_dims", FACTORS)
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_outputs_and_gradients_equal_the_dense_formula(in_dims, out_dims, wants):
    torch.manual_seed(0)
    circuit = plan_circuit(in_dims, out_dims)
    theta0 = init_gates(circuit).double()
    theta = (theta0 + 0.3 * torch.randn_like(theta0)).requires_grad_(wants[1])
    x = torch.randn(3, 5, math.prod(in_dims), dtype=torch.float64, requires_grad=wants[0])
    y = circuit_difference(Schedule(circuit), x, theta, torch.cat([theta0, -theta0]), torch.float64)
    ref_theta, ref_x = theta.detach().clone().requires_grad_(wants[1]), x.detach().clone().requires_grad_(wants[0])
    ref = _dense_reference(circuit, ref_theta, theta0, ref_x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    inputs = [t for t, w in zip((x, theta), wants) if w]
    ref_inputs = [t for t, w in zip((ref_x, ref_theta), wants) if w]
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, ref_inputs, g)):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt_quanta.plugin, name="quanta", distribution="modapt-quanta")
    return modapt_registry


def _adapted(registry, out_f, in_f, dims=None, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    opts = {"dims": dims} if dims else {}
    model = modapt.apply(nn.Sequential(nn.Linear(in_f, out_f)),
                         {"adapter": [{"method": "quanta", "targets": ["0"], "dropout": dropout, **opts}]},
                         registry=registry)
    with torch.no_grad():
        model[0].quanta_theta.add_(0.2 * torch.randn_like(model[0].quanta_theta))
    return model


@pytest.mark.parametrize("out_f,in_f,dims", [(48, 48, [4, 3, 2, 2]), (96, 48, [4, 3, 2, 2]), (48, 96, [4, 3, 2, 2])])
def test_layer_input_gradient_is_the_adapted_weight_transposed(registry, out_f, in_f, dims):
    """∂L/∂x = (W0 + ΔW)ᵀ g: the frozen circuit is constant in θ but not in x (the former path dropped −T(θ0)ᵀ g)."""
    model = _adapted(registry, out_f, in_f, dims)
    host = model[0]
    x = torch.randn(4, 7, in_f, requires_grad=True)
    g = torch.randn(4, 7, out_f)
    (gx,) = torch.autograd.grad(model(x), x, g)
    with torch.no_grad():
        w = host.base_layer.weight + host.update.delta_weight(host.base_layer.weight)
    torch.testing.assert_close(gx, g @ w, atol=1e-5, rtol=1e-5)


def _einsum_reference(host, x):
    """The plain-einsum path: dropout(x) through T(θ), x through T(θ0) (both differentiable in x)."""
    theta, theta0 = host.quanta_theta, host.quanta_theta0
    xd = host.quanta_dropout(x)
    base = host.base_layer(x)
    return base + (apply_circuit(host.update.circuit, theta, xd)
                   - apply_circuit(host.update.circuit, theta0.to(theta.dtype), x)).to(base.dtype)


@pytest.mark.parametrize("out_f,in_f", [(48, 48), (96, 48), (48, 96)])
def test_bf16_autocast_on_cpu_matches_the_einsum_reference(registry, out_f, in_f):
    model = _adapted(registry, out_f, in_f, [4, 3, 2, 2])
    host = model[0]
    x = torch.randn(2, 16, in_f, requires_grad=True)
    g = torch.randn(2, 16, out_f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        ref = _einsum_reference(host, x)
    assert y.dtype == ref.dtype == torch.bfloat16
    got = torch.autograd.grad(y, (x, host.quanta_theta), g)
    want = torch.autograd.grad(ref, (x, host.quanta_theta), g)
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[1], want[1], atol=0.05 * want[1].abs().max().item(), rtol=0)
    # the reference's x-gradient agrees only through T(θ): compare with the fp32 dense formula instead
    with torch.no_grad():
        w = host.base_layer.weight + host.update.delta_weight(host.base_layer.weight)
    torch.testing.assert_close(got[0], g @ w, atol=0.05 * (g @ w).abs().max().item(), rtol=0)


def test_bf16_base_computes_in_float32_and_keeps_x_in_bf16(registry):
    model = _adapted(registry, 48, 96, [4, 3, 2, 2]).to(torch.bfloat16)
    host = model[0]
    host.quanta_theta.data = host.quanta_theta.data.float()  # the core keeps adapters in fp32 on bf16 bases
    host.quanta_theta0.data = host.quanta_theta0.data.float()
    x = torch.randn(256, 96, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = host.update.forward(x, None, host.base_layer)
    assert y.dtype == torch.float32
    with torch.no_grad():
        ref = x.float() @ host.update.delta_weight(torch.zeros(48, 96)).t()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # nothing of activation size is stored in float32: x itself (bf16) and the small gate pack
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    assert all(t.data_ptr() == x.data_ptr() or t.numel() < x.numel() // 2 for t in saved)
    gx, gt = torch.autograd.grad(y.sum(), (x, host.quanta_theta))
    assert gx.dtype == torch.bfloat16 and gt.dtype == torch.float32


def test_only_the_input_is_saved_for_backward(registry):
    """The saved activations of an adapted layer are x alone (shared with the base matmul), as LoRA's."""
    model = _adapted(registry, 96, 96, [4, 3, 2, 2, 2])
    x = torch.randn(256, 96, requires_grad=True)  # larger than W0 and the gate pack
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.data_ptr() == x.data_ptr() for t in big)


def test_dropout_acts_on_the_trainable_circuit_only(registry):
    """Official placement: y = W0 x + T(θ) drop(x) − T(θ0) x (the official code merges T(θ0) into W0)."""
    model = _adapted(registry, 48, 48, [4, 3, 2, 2], dropout=0.3)
    host = model[0]
    x = torch.randn(5, 48, requires_grad=True)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(x, 0.3)
    t_theta = circuit_matrix(host.update.circuit, host.quanta_theta)
    t_theta0 = circuit_matrix(host.update.circuit, host.quanta_theta0)
    ref = host.base_layer(x) + xd @ t_theta.t() - x @ t_theta0.t()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, host.quanta_theta), g),
                         torch.autograd.grad(ref, (x, host.quanta_theta), g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model.eval()  # no dropout: ΔW x exactly
    with torch.no_grad():
        torch.testing.assert_close(model(x), host.base_layer(x) + x @ (t_theta - t_theta0).t(), atol=1e-5, rtol=1e-5)


def test_frozen_cache_follows_theta0(registry):
    """A θ0 changed in place (a load) is picked up: the cached cast of [θ0, −θ0] is rebuilt."""
    model = _adapted(registry, 48, 48, [4, 3, 2, 2])
    host = model[0]
    x = torch.randn(5, 48)
    model(x)
    with torch.no_grad():
        host.quanta_theta0.add_(0.1)
        ref = host.base_layer(x) + x @ host.update.delta_weight(host.base_layer.weight).t()
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_dims,out_dims", [([3, 2, 2], [4, 3, 2]), ([4, 3], [2, 5])])
def test_token_chunks_change_nothing(monkeypatch, in_dims, out_dims):
    """A small working-memory budget splits the tokens into chunks: same outputs and gradients."""
    import modapt_quanta.difference as difference

    torch.manual_seed(0)
    circuit = plan_circuit(in_dims, out_dims)
    theta0 = init_gates(circuit).double()
    theta = (theta0 + 0.3 * torch.randn_like(theta0)).requires_grad_()
    x = torch.randn(37, math.prod(in_dims), dtype=torch.float64, requires_grad=True)
    schedule = Schedule(circuit)
    per_token = difference._TENSORS_PER_TOKEN * schedule.widest * 8
    monkeypatch.setattr(difference, "WORK_BYTES", 5 * per_token)  # chunks of 5 tokens, the last one of 2
    assert len(difference._chunks(schedule, 37, torch.float64)[0]) == 8
    y = circuit_difference(schedule, x, theta, torch.cat([theta0, -theta0]), torch.float64)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, theta), g)
    ref_theta, ref_x = theta.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref = _dense_reference(circuit, ref_theta, theta0, ref_x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(got, torch.autograd.grad(ref, (ref_x, ref_theta), g)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_autocast_saves_one_bf16_copy_of_an_input_read_by_several_layers(registry):
    """q, k, v under autocast: the frozen bases save no activation; QuanTA saves x once, in bf16."""
    torch.manual_seed(0)
    model = modapt.apply(nn.ModuleList([nn.Linear(48, 48), nn.Linear(48, 24), nn.Linear(48, 24)]),
                         {"adapter": [{"method": "quanta", "targets": ["Linear"]}]}, registry=registry)
    with torch.no_grad():
        for host in model:
            host.quanta_theta.add_(0.2 * torch.randn_like(host.quanta_theta))
    x = torch.randn(512, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        ys = [layer(x) for layer in model]
    activations = {t.untyped_storage().data_ptr() for t in saved if t.shape == x.shape}
    assert len(activations) == 1 and all(t.dtype == torch.bfloat16 for t in saved if t.shape == x.shape)
    gs = [torch.randn_like(y) for y in ys]
    (shared,) = torch.autograd.grad(ys, x, gs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # each layer on its own copy of x: no sharing
        alone = [torch.autograd.grad(layer(x.clone()), x, g)[0] for layer, g in zip(model, gs)]
    # the shared copy sums the three bf16 input gradients in bf16 (one rounding more than fp32 sums)
    want = sum(alone)
    torch.testing.assert_close(shared, want, atol=1e-2 * want.abs().max().item(), rtol=0)
