import modapt.lora
import modapt_lorma.plugin
import pytest


@pytest.fixture
def registry(modapt_registry):
    """An isolated registry with LoRA (core) and LoRMA registered."""
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_lorma.plugin, name="lorma", distribution="modapt-lorma")
    return modapt_registry
