"""FLoRA against independent computations: explicit matrices, core LoRA, closed-form norms."""

import modapt
import modapt.lora
import modapt_flora.plugin
import pytest
import torch
from modapt.testing import tiny_llama
from modapt.testing.models import train_losses
from torch import nn


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_flora.plugin, name="flora", distribution="modapt-flora")
    return modapt_registry


def _layer_model(out_f=12, in_f=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


def _recipe(method, **opts):
    return {"adapter": [{"method": method, "targets": ["0"], **opts}]}


def test_init_shapes_and_zero_core(registry):
    model = modapt.apply(_layer_model(), _recipe("flora", r=3, lora_alpha=6.0), registry=registry)
    host = model[0]
    assert host.flora_A.shape == (3, 10) and host.flora_G.shape == (3, 3) and host.flora_B.shape == (12, 3)
    assert torch.count_nonzero(host.flora_G) == 0
    assert torch.count_nonzero(host.flora_A) == 30 and torch.count_nonzero(host.flora_B) == 36
    assert abs(host.flora_A).max() <= 1 / 10 ** 0.5 and abs(host.flora_B).max() <= 1 / 3 ** 0.5


def test_forward_and_delta_weight_equal_the_written_out_formula(registry):
    model = modapt.apply(_layer_model(), _recipe("flora", r=3, lora_alpha=6.0), registry=registry)
    host = model[0]
    with torch.no_grad():
        host.flora_G.copy_(torch.randn(3, 3))
    a, g, b = (host.flora_A.detach().double(), host.flora_G.detach().double(), host.flora_B.detach().double())
    w0 = host.base_layer.weight.detach().double()
    delta = 2.0 * (b @ g @ a)                           # s = 6 / 3
    x = torch.randn(4, 5, 10)
    expected = x.double() @ (w0 + delta).t() + host.base_layer.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(host.update.delta_weight(w0.float()).double(), delta, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(host.update.frobenius_sq(w0.float()).double(), (delta ** 2).sum(),
                                   atol=1e-6, rtol=1e-5)


def test_core_identity_equals_lora_with_the_same_factors(registry):
    x = torch.randn(3, 7, 10)
    flora = modapt.apply(_layer_model(), _recipe("flora", r=4, lora_alpha=12.0), registry=registry)
    lora = modapt.apply(_layer_model(), _recipe("lora", r=4, lora_alpha=12.0), registry=registry)
    with torch.no_grad():
        flora[0].flora_G.copy_(torch.eye(4))
        flora[0].flora_B.normal_()          # a trained-looking B: LoRA's starts at zero
        lora[0].lora_A.weight.copy_(flora[0].flora_A)
        lora[0].lora_B.weight.copy_(flora[0].flora_B)
        torch.testing.assert_close(flora(x), lora(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(flora[0].merged_weight(), lora[0].merged_weight(), atol=1e-6, rtol=1e-6)


def test_every_factor_gets_gradient_at_init(registry):
    model = modapt.apply(_layer_model(), _recipe("flora", r=3), registry=registry)
    model(torch.randn(5, 10)).pow(2).sum().backward()
    host = model[0]
    assert host.flora_G.grad.abs().sum() > 0          # A and B random: the core learns at once
    assert torch.count_nonzero(host.flora_A.grad) == 0 and torch.count_nonzero(host.flora_B.grad) == 0
    # after one step on G, A and B get gradient too
    with torch.no_grad():
        host.flora_G.sub_(0.1 * host.flora_G.grad)
    host.flora_A.grad = host.flora_B.grad = None
    model(torch.randn(5, 10)).pow(2).sum().backward()
    assert host.flora_A.grad.abs().sum() > 0 and host.flora_B.grad.abs().sum() > 0


def test_conv1d_layers_of_gpt2(registry):
    from modapt.testing import tiny_gpt2

    model = modapt.apply(tiny_gpt2(), {"adapter": [{"method": "flora", "r": 2, "targets": ["c_attn"]}]},
                         registry=registry)
    host = model.transformer.h[0].attn.c_attn
    assert host.flora_A.shape == (2, 64) and host.flora_B.shape == (192, 2)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        host.flora_G.normal_()
        w0 = host.base_layer.weight.t()               # Conv1D stores [in, out]
        delta = 4.0 * host.flora_B @ host.flora_G @ host.flora_A   # s = lora_alpha / r = 8 / 2
        torch.testing.assert_close(host(x), x @ (w0 + delta).t() + host.base_layer.bias, atol=1e-5, rtol=1e-5)



def test_rank_larger_than_the_layer_is_a_recipe_error(registry):
    with pytest.raises(modapt.RecipeError, match="r = 20 exceeds"):
        modapt.apply(_layer_model(), _recipe("flora", r=20), registry=registry)


def test_unknown_key_is_a_recipe_error(registry):
    with pytest.raises(modapt.RecipeError, match="unknown key 'rank'"):
        modapt.apply(_layer_model(), _recipe("flora", rank=2), registry=registry)


def test_embeddings_are_refused(registry):
    with pytest.raises(modapt.TargetError, match="flora adapts conv1d, linear layers"):
        modapt.apply(tiny_llama(), {"adapter": [{"method": "flora", "targets": ["embed_tokens"]}]}, registry=registry)


def test_trains_on_a_tiny_llama(registry):
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "flora", "r": 4, "lora_alpha": 8.0,
                                                     "targets": ["q_proj", "v_proj"]}]}, registry=registry)
    losses = train_losses(model, 15)
    assert losses[-1] < losses[0] - 0.05


def test_flomap_trains_when_map_is_installed(registry):
    map_plugin = pytest.importorskip("modapt_map.plugin")
    registry.register_plugin(map_plugin, name="map", distribution="modapt-map")
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "map", "targets": ["q_proj", "v_proj"],
                                                     "update": {"method": "flora", "r": 4}}]}, registry=registry)
    losses = train_losses(model, 15)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
