"""Adapters are created on the base's device, and an update is placed before a reparam reads it.

The meta device stands in for a GPU here: a tensor left on the CPU meets a meta tensor and fails
exactly like a CPU tensor meeting a CUDA one (the bug DoRA hit on the H100).
"""

import types

import torch

import modapt
import modapt.builtin
import modapt.lora
from modapt import layers


class ReadsUpdateAtBuild(modapt.Additive):
    """A reparam that, like DoRA's magnitude init, multiplies the update's ΔW with W0 when built."""

    def __init__(self, host, options, update):
        super().__init__(host, options, update)
        w0 = layers.weight_of(host.base_layer)
        host.register_buffer("seen_norm", (w0 + update.delta_weight(w0)).norm(dim=1))


def test_adapters_are_built_on_the_base_device(modapt_registry):
    plugin = types.SimpleNamespace(modapt_register_methods=modapt.hookimpl(lambda register: register(modapt.Method(
        name="reads", family="reparam", options=modapt.builtin.AdditiveOptions, build=ReadsUpdateAtBuild,
        own_keys=(), capabilities=modapt.Capabilities(mergeable=True, layer_kinds=frozenset({"linear"}))))))
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    modapt_registry.register_plugin(plugin, "reads", "test")
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    modapt.apply(model, {"adapter": [{"method": "lora", "r": 2, "targets": ["0"]},
                                     {"method": "reads", "targets": ["1"], "update": {"method": "lora", "r": 2}}]})
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert tensor.device.type == "meta", f"{name} is on {tensor.device}"


def test_a_plugin_bug_in_build_names_the_distribution_and_restores_the_model(modapt_registry):
    def broken(host, options):
        raise KeyError("oops")

    plugin = types.SimpleNamespace(modapt_register_methods=modapt.hookimpl(lambda register: register(modapt.Method(
        name="broken", family="update", options=modapt.builtin.AdditiveOptions, build=broken, own_keys=(),
        capabilities=modapt.Capabilities(mergeable=True)))))
    modapt_registry.register_plugin(plugin, "broken", "modapt-broken")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    import pytest

    with pytest.raises(modapt.PluginError, match=r"'broken' \(modapt-broken\) failed to build 'broken' on '0': KeyError"):
        modapt.apply(model, {"adapter": [{"method": "broken", "targets": ["0"]}]})
    assert type(model[0]) is torch.nn.Linear and not modapt.is_adapted(model)
