"""Bottleneck adapters as named adapters beside a LoRA (issue 36): switch, disable, rows, save
one (:func:`modapt.testing.conformance.check_named_beside_lora`), for the hook kinds: series
(output hook), parallel (input and output of one module), pfeiffer (stashed residual)."""

import modapt.lora
import modapt_bottleneck.plugin
import pytest
from modapt.registry import Registry, use_registry
from modapt.testing.conformance import check_named_beside_lora


@pytest.fixture(scope="module")
def registry():
    registry = Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    registry.register_plugin(modapt_bottleneck.plugin, name="bottleneck", distribution="modapt-bottleneck")
    with use_registry(registry):
        yield registry


@pytest.mark.parametrize("placement", ["series", "parallel", "pfeiffer"])
def test_bottleneck_beside_lora(registry, tmp_path, placement):
    check_named_beside_lora({"method": "bottleneck", "placement": placement, "r": 4}, registry, tmp_path)
