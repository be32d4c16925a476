"""QuanTA against the definition written out entry by entry, and its recipe errors."""

import itertools
import math

import modapt
import modapt_quanta.plugin
import pytest
import torch
from modapt.testing import tiny_gpt2, tiny_inputs, tiny_llama
from modapt.testing.models import train_losses
from modapt_quanta import factorize, plan_circuit
from modapt_quanta.circuit import split_gates
from torch import nn


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt_quanta.plugin, name="quanta", distribution="modapt-quanta")
    return modapt_registry


def _layer(out_f, in_f, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


def _recipe(**opts):
    return {"adapter": [{"method": "quanta", "targets": ["0"], **opts}]}


def _gate_matrix(gate, axis_a, axis_b, dims_before, dims_after):
    """The full matrix [∏ dims_after, ∏ dims_before] of one gate, entry by entry from the definition:
    F[o, i] = G[o_a, o_b, i_a, i_b] · ∏_{k ∉ {a, b}} δ(o_k, i_k), multi-indices row-major."""
    rows, cols = math.prod(dims_after), math.prod(dims_before)
    full = torch.zeros(rows, cols, dtype=torch.float64)
    for r, o in enumerate(itertools.product(*map(range, dims_after))):
        for c, i in enumerate(itertools.product(*map(range, dims_before))):
            if all(o[k] == i[k] for k in range(len(o)) if k not in (axis_a, axis_b)):
                full[r, c] = gate[o[axis_a], o[axis_b], i[axis_a], i[axis_b]]
    return full


def _explicit_operator(in_dims, out_dims, flat):
    """T(θ) = F_last ⋯ F_first, each F a full gate matrix; pairs in the official order (N−2, N−1), …, (0, 1)."""
    circuit = plan_circuit(in_dims, out_dims)
    n = len(in_dims)
    assert circuit.pairs == tuple((n + b, n + a) for a, b in itertools.combinations(range(-1, -n - 1, -1), 2))
    current = list(in_dims)
    total = torch.eye(math.prod(in_dims), dtype=torch.float64)
    for gate, (a, b) in zip(split_gates(circuit, flat.double()), circuit.pairs):
        after = list(current)
        after[a], after[b] = gate.shape[0], gate.shape[1]
        total = _gate_matrix(gate, a, b, current, after) @ total
        current = after
    assert current == list(out_dims)
    return total


@pytest.mark.parametrize("out_f,in_f,dims", [(12, 12, [3, 2, 2]), (24, 12, [3, 2, 2]), (12, 24, [2, 3, 2]),
                                             (16, 16, [2, 2, 2, 2])])
def test_delta_weight_and_forward_equal_the_explicit_construction(registry, out_f, in_f, dims):
    model = modapt.apply(_layer(out_f, in_f), _recipe(dims=dims), registry=registry)
    host = model[0]
    with torch.no_grad():
        host.quanta_theta.add_(0.3 * torch.randn_like(host.quanta_theta))
    circuit = host.update.circuit
    delta = (_explicit_operator(circuit.in_dims, circuit.out_dims, host.quanta_theta.detach())
             - _explicit_operator(circuit.in_dims, circuit.out_dims, host.quanta_theta0))
    assert delta.shape == (out_f, in_f)
    w0 = host.base_layer.weight.detach()
    with torch.no_grad():
        torch.testing.assert_close(host.update.delta_weight(w0.double()), delta, atol=1e-10, rtol=1e-10)
        x = torch.randn(3, 5, in_f)
        expected = x.double() @ (w0.double() + delta).t() + host.base_layer.bias.double()
        torch.testing.assert_close(model(x).double(), expected, atol=1e-5, rtol=1e-5)
    # the update is high-rank: full rank, beyond any single gate's size
    assert torch.linalg.matrix_rank(delta) == min(out_f, in_f)


def test_init_equals_the_base_and_theta0_is_a_frozen_copy(registry):
    model = modapt.apply(_layer(16, 16), _recipe(), registry=registry)
    host = model[0]
    assert torch.equal(host.quanta_theta.detach(), host.quanta_theta0)
    assert not host.quanta_theta0.requires_grad and "quanta_theta0" in dict(host.named_buffers())
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(model(x), host.base_layer(x))
        assert torch.count_nonzero(host.update.delta_weight(host.base_layer.weight)) == 0
    model(x).pow(2).sum().backward()
    assert host.quanta_theta.grad.abs().sum() > 0


def test_default_init_is_the_official_kaiming_uniform():
    """Official: kaiming_uniform_(gate as [o_m·o_n, i_m·i_n], a=√5, nonlinearity='linear') = U(±√(3/fan_in))."""
    from modapt_quanta.circuit import init_gates

    circuit = plan_circuit([4, 3, 2], [2, 3, 4])
    torch.manual_seed(3)
    got = init_gates(circuit)
    torch.manual_seed(3)
    bounds = [math.sqrt(3 / (i_a * i_b)) for _, _, i_a, i_b in circuit.shapes]
    want = torch.cat([torch.empty(o_a * o_b, i_a * i_b).uniform_(-b, b).reshape(-1)
                      for (o_a, o_b, i_a, i_b), b in zip(circuit.shapes, bounds)])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


def test_square_gates_start_orthogonal(registry):
    model = modapt.apply(_layer(16, 16), _recipe(dims=[4, 2, 2], init="orthogonal"), registry=registry)
    host = model[0]
    from modapt_quanta.circuit import circuit_matrix

    t = circuit_matrix(host.update.circuit, host.quanta_theta0)
    torch.testing.assert_close(t @ t.t(), torch.eye(16), atol=1e-5, rtol=0)


def test_default_factorisation_rule():
    assert factorize(4096, 4) == [8, 8, 8, 8]
    assert factorize(5120, 4) == [10, 8, 8, 8]
    assert factorize(11008, 4) == [43, 8, 8, 4]
    assert factorize(64, 4) == [4, 4, 2, 2]
    assert factorize(96, 3) == [6, 4, 4]
    for d, n in [(4096, 4), (11008, 4), (768, 3), (3072, 5)]:
        f = factorize(d, n)
        assert math.prod(f) == d and len(f) == n and min(f) > 1


def test_paper_setting_16_8_8_4_on_square_and_ffn_layers():
    """Table 17's 16-8-8-4 on q_proj (4096²) and down_proj (11008 -> 4096) of LLaMA-7B (plans only)."""
    from modapt_quanta.quanta import QuantaOptions, layer_factors

    options = QuantaOptions(dims=[16, 8, 8, 4])
    square = plan_circuit(*layer_factors(4096, 4096, options))
    assert square.in_dims == square.out_dims == (16, 8, 8, 4)
    # 64 adapted layers (q, v in 32 blocks) · 43008 = 2.75 M = QuanTA's 0.041 % of LLaMA-7B
    assert square.num_parameters == 2 * 128 ** 2 + 2 * 64 ** 2 + 2 * 32 ** 2 == 43008
    down = plan_circuit(*layer_factors(4096, 11008, options))
    assert down.in_dims == (43, 8, 8, 4) and down.out_dims == (16, 8, 8, 4)
    up = plan_circuit(*layer_factors(11008, 4096, options))
    assert up.in_dims == (16, 8, 8, 4) and up.out_dims == (43, 8, 8, 4)


def test_dims_that_fit_neither_side_is_a_clear_error(registry):
    with pytest.raises(modapt.RecipeError, match=r"dims \[4, 4\] multiply to 16, but this layer maps 12 -> 12"):
        modapt.apply(_layer(12, 12), _recipe(dims=[4, 4]), registry=registry)


def test_a_dimension_that_cannot_be_factored_is_a_clear_error(registry):
    with pytest.raises(modapt.RecipeError, match=r"cannot factor 13 .* into 4 factors.*num_axes.*dims"):
        modapt.apply(_layer(13, 13), _recipe(), registry=registry)
    with pytest.raises(modapt.RecipeError, match=r"cannot factor 6 .* into 3 factors"):
        modapt.apply(_layer(6, 12), _recipe(dims=[3, 2, 2]), registry=registry)


def test_option_errors(registry):
    with pytest.raises(modapt.RecipeError, match="dims"):
        modapt.apply(_layer(12, 12), _recipe(dims=[12, 1]), registry=registry)
    with pytest.raises(modapt.RecipeError, match="num_axes = 2 but dims"):
        modapt.apply(_layer(12, 12), _recipe(dims=[3, 2, 2], num_axes=2), registry=registry)


def test_gpt2_conv1d_non_square(registry):
    model = modapt.apply(tiny_gpt2(), {"adapter": [{"method": "quanta", "targets": ["c_attn"]}]}, registry=registry)
    host = model.transformer.h[0].attn.c_attn
    assert host.update.circuit.in_dims == (4, 4, 2, 2) and host.update.circuit.out_dims == (4, 4, 4, 3)
    with torch.no_grad():
        host.quanta_theta.add_(0.1 * torch.randn_like(host.quanta_theta))
        x = torch.randn(2, 3, 64)
        w = host.base_layer.weight.t() + host.update.delta_weight(host.base_layer.weight.t())
        torch.testing.assert_close(host(x), x @ w.t() + host.base_layer.bias, atol=1e-5, rtol=1e-5)


def test_trains_on_a_tiny_llama_and_saves_theta0(registry, tmp_path):
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "quanta", "targets": ["q_proj", "v_proj"]}]},
                         registry=registry)
    inputs = tiny_inputs()
    losses = train_losses(model, 6, inputs=inputs)
    assert losses[-1] < losses[0] - 0.05
    assert "model.layers.0.self_attn.q_proj.quanta_theta0" in modapt.adapter_state_dict(model)
    modapt.save(model, tmp_path / "a", registry=registry)
    torch.manual_seed(123)            # a different θ0 at apply: load must overwrite it with the saved one
    loaded = modapt.load(tiny_llama(), tmp_path / "a", registry=registry)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_map_over_quanta_merges_when_map_is_installed(registry):
    """QuanTA has no cheap norm (frobenius_sq is None): MAP must still train and merge over it."""
    map_plugin = pytest.importorskip("modapt_map.plugin")
    registry.register_plugin(map_plugin, name="map", distribution="modapt-map")
    model = modapt.apply(_layer(16, 16), {"adapter": [{"method": "map", "targets": ["0"],
                                                       "update": {"method": "quanta", "dims": [4, 2, 2]}}]},
                         registry=registry)
    assert model[0].update.frobenius_sq(model[0].base_layer.weight) is None
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 16)
    model(x).pow(2).sum().backward()
    assert model[0].quanta_theta.grad.abs().sum() > 0
    with torch.no_grad():
        expected = model(x)
        modapt.merge(model)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
