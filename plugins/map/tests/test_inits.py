"""The two initialisations at ΔW = 0 (LoRA's B = 0): identity at init, finite gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modapt

OUT, IN = 10, 12


class Holder(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layer = nn.Linear(IN, OUT)
        with torch.no_grad():
            for p in self.layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.layer(x)


def lomap(init: str, **options) -> dict:
    return {"adapter": [{"method": "map", "targets": ["layer"], "init": init, **options,
                         "update": {"method": "lora", "r": 4, "lora_alpha": 8.0}}]}


def lora() -> dict:
    return {"adapter": [{"method": "lora", "targets": ["layer"], "r": 4, "lora_alpha": 8.0}]}


X = torch.randn(3, 4, IN, generator=torch.Generator().manual_seed(5))


def loss_of(model):
    return model(X).pow(2).mean()


def test_paper_init_is_the_papers(registry):
    torch.manual_seed(0)
    model = modapt.apply(Holder(), lomap("paper"), registry=registry)
    host = model.layer
    assert float(host.map_alpha.detach()) == pytest.approx(float(Holder().layer.weight.detach().norm()), rel=1e-6)
    assert float(host.map_beta.detach()) == 1.0
    assert not host.lora_B.weight.any(), "paper init keeps the update's own init (LoRA's B = 0)"
    torch.manual_seed(0)
    plain = modapt.apply(Holder(), lora(), registry=registry)
    assert torch.equal(host.lora_A.weight, plain.layer.lora_A.weight)


def test_paper_init_at_zero_update_is_identity_with_finite_but_eps_scaled_gradients(registry):
    torch.manual_seed(0)
    model = modapt.apply(Holder(), lomap("paper"), registry=registry)
    torch.manual_seed(0)
    plain = modapt.apply(Holder(), lora(), registry=registry)
    with torch.no_grad():
        assert torch.equal(model(X), Holder()(X))
        assert torch.equal(model.layer.merged_weight(), Holder().layer.weight)
    loss_of(model).backward()
    loss_of(plain).backward()
    for name, p in modapt.trainable_parameters(model).items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # ΔW/max(‖ΔW‖, eps) at ΔW = 0: B's gradient is LoRA's multiplied by β/eps = 1e6
    torch.testing.assert_close(model.layer.lora_B.weight.grad, plain.layer.lora_B.weight.grad / 1e-6, rtol=1e-5,
                               atol=0)
    assert float(model.layer.map_beta.grad) == 0.0  # ⟨∂L/∂W*, ΔW⟩/eps with ΔW = 0


def test_identity_init_is_exactly_the_base_with_finite_gradients(registry):
    model = modapt.apply(Holder(), lomap("identity"), registry=registry)
    host = model.layer
    assert float(host.map_beta.detach()) == 0.0
    assert host.lora_B.weight.all(), "identity init re-initialises the all-zero B"
    assert 0.5e-3 < float(host.lora_B.weight.detach().std()) < 2e-3  # identity_std = 1e-3
    with torch.no_grad():
        assert torch.equal(model(X), Holder()(X))
        assert torch.equal(host.merged_weight(), Holder().layer.weight)
    loss_of(model).backward()
    grads = {n: p.grad for n, p in modapt.trainable_parameters(model).items()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert float(grads["layer.map_beta"]) != 0.0, "β learns from the first step"
    assert not grads["layer.lora_A.weight"].any() and not grads["layer.lora_B.weight"].any()  # β = 0
    opt = torch.optim.AdamW(modapt.trainable_parameters(model).values(), lr=1e-2)
    opt.step()
    opt.zero_grad()
    loss_of(model).backward()
    grads = {n: p.grad for n, p in modapt.trainable_parameters(model).items()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["layer.lora_B.weight"].abs().max() > 0 and grads["layer.lora_A.weight"].abs().max() > 0
    # the update's gradients are of the size of plain LoRA's, not 1/eps larger
    assert float(grads["layer.lora_B.weight"].norm()) < 1e3


def test_identity_init_keeps_nonzero_parameters(registry):
    torch.manual_seed(0)
    model = modapt.apply(Holder(), lomap("identity", identity_std=0.1), registry=registry)
    torch.manual_seed(0)
    plain = modapt.apply(Holder(), lora(), registry=registry)
    assert torch.equal(model.layer.lora_A.weight, plain.layer.lora_A.weight)
    assert 0.05 < float(model.layer.lora_B.weight.detach().std()) < 0.2


class Cancelling(modapt.Update):
    """ΔW = P − Q with P = Q at init: no parameter is zero, yet ΔW is."""

    def __init__(self, host, options):
        super().__init__(host, options)
        p = torch.randn(OUT, IN)
        host.register_parameter("cancel_p", nn.Parameter(p.clone()))
        host.register_parameter("cancel_q", nn.Parameter(p.clone()))

    def forward(self, x, base_out, base_layer):
        return torch.nn.functional.linear(x, self.host.cancel_p - self.host.cancel_q)

    def delta_weight(self, w0):
        return self.host.cancel_p - self.host.cancel_q


class Nothing(modapt.Update):
    """ΔW ≡ 0 with no parameters: no perturbation can give it a direction."""

    def forward(self, x, base_out, base_layer):
        return torch.zeros_like(base_out)

    def delta_weight(self, w0):
        return torch.zeros_like(w0)


class TestUpdatesPlugin:
    @staticmethod
    @modapt.hookimpl
    def modapt_register_methods(register):
        caps = modapt.Capabilities(mergeable=True, composes_with=frozenset({"reparam"}))
        register(modapt.Method(name="cancelling", family="update", options=modapt.Options, build=Cancelling,
                               own_keys=("cancel_p", "cancel_q"), capabilities=caps))
        register(modapt.Method(name="nothing", family="update", options=modapt.Options, build=Nothing,
                               own_keys=(), capabilities=caps))


def map_over(update: str, **options) -> dict:
    return {"adapter": [{"method": "map", "targets": ["layer"], **options, "update": {"method": update}}]}


def test_identity_init_perturbs_an_update_that_is_zero_without_a_zero_parameter(registry):
    registry.register_plugin(TestUpdatesPlugin, name="test_updates")
    model = modapt.apply(Holder(), map_over("cancelling"), registry=registry)
    host = model.layer
    delta = host.cancel_p - host.cancel_q
    assert 0.5e-3 < float(delta.detach().std()) < 3e-3  # P and Q both moved by N(0, 1e-3²)
    with torch.no_grad():
        assert torch.equal(model(X), Holder()(X))
    loss_of(model).backward()
    assert float(host.map_beta.grad) != 0.0


def test_identity_init_refuses_an_update_that_stays_zero(registry):
    registry.register_plugin(TestUpdatesPlugin, name="test_updates")
    with pytest.raises(modapt.RecipeError, match="needs a non-zero update"):
        modapt.apply(Holder(), map_over("nothing"), registry=registry)
    paper = modapt.apply(Holder(), map_over("nothing", init="paper"), registry=registry)
    with torch.no_grad():
        assert torch.equal(paper(X), Holder()(X))


def test_a_zero_base_weight_is_refused(registry):
    zero = Holder()
    with torch.no_grad():
        zero.layer.weight.zero_()
    with pytest.raises(modapt.RecipeError, match="‖W0‖_F is 0"):
        modapt.apply(zero, lomap("identity"), registry=registry)


@pytest.mark.parametrize("entry, match", [
    ({"init": "zeros"}, "paper.*identity"),
    ({"schedule": "alternating"}, "joint.*stepwise"),
    ({"period": 0}, "greater than 0"),
    ({"eps": -1.0}, "greater than 0"),
    ({"scope": "column"}, "unknown key 'scope'"),
])
def test_bad_options_name_the_key_and_the_accepted_values(registry, entry, match):
    recipe = {"adapter": [{"method": "map", "targets": ["layer"], **entry, "update": {"method": "lora"}}]}
    with pytest.raises(modapt.RecipeError, match=match) as info:
        modapt.parse_recipe(recipe, registry)
    assert f"adapter[0].{next(iter(entry))}" in str(info.value)
