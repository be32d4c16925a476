"""A registry with LoRA and AdaLoRA only (autoloading off), the default for each test."""

import modapt.lora
import modapt_adalora.plugin
import pytest


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_adalora.plugin, name="adalora", distribution="modapt-adalora")
    return modapt_registry
