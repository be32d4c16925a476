import pytest


@pytest.fixture
def registry(modapt_registry):
    """An isolated registry with the core's LoRA and this plugin's LMAM."""
    import modapt.lora
    import modapt_lmam.plugin

    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_lmam.plugin, name="lmam", distribution="modapt-lmam")
    return modapt_registry
