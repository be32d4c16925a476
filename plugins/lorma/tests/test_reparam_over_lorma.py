"""A reparam over LoRMA through the update contract only (what MAP does): frobenius_sq, or ΔW when it is None."""

import modapt
import pydantic
import pytest
import torch
from modapt import Capabilities, Method, Options, Reparam, hookimpl
from torch import nn


class NormScaledOptions(Options):
    alpha: float = pydantic.Field(0.5)


class NormScaled(Reparam):
    """W = W0 + alpha · ΔW / ‖ΔW‖_F: needs ‖ΔW‖ in every step, like MAP's direction term."""

    def norm_sq(self, w0):
        value = self.update.frobenius_sq(w0)
        return value if value is not None else self.update.delta_weight(w0).pow(2).sum()

    def forward(self, x, *args, **kwargs):
        base_out = self.base_layer(x, *args, **kwargs)
        w0 = modapt.layers.weight_of(self.base_layer)
        scale = self.options.alpha / self.norm_sq(w0).clamp_min(1e-12).sqrt()
        return base_out + (scale * self.update.forward(x, base_out, self.base_layer)).to(base_out.dtype)

    def merged_weight(self, w0):
        return w0 + self.options.alpha * self.update.delta_weight(w0) / self.norm_sq(w0).sqrt()


class plugin:
    @staticmethod
    @hookimpl
    def modapt_register_methods(register):
        register(Method(name="normscaled", family="reparam", options=NormScaledOptions, build=NormScaled,
                        own_keys=(), capabilities=Capabilities(mergeable=True, composes_with=frozenset({"update"}))))


@pytest.mark.parametrize("inflation", ["plus", "pi", "none"])
def test_reparam_over_lorma(registry, inflation):
    registry.register_plugin(plugin, name="normscaled", distribution="test-normscaled")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20))
    recipe = {"adapter": [{"method": "normscaled", "targets": ["0"],
                           "update": {"method": "lorma", "r": 3, "inflation": inflation}}]}
    modapt.apply(net, recipe, registry=registry)
    with torch.no_grad():
        for p in modapt.trainable_parameters(net).values():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 12)
    out = net(x)
    out.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in modapt.trainable_parameters(net).values())
    host = net[0]
    w0 = host.base_layer.weight.detach()
    delta = host.update.delta_weight(w0)
    expected = x @ (w0 + 0.5 * delta / delta.norm()).t() + host.base_layer.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        modapt.merge(net, unload=True)
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
