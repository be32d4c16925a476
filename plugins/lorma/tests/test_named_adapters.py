"""LoRMA as a named adapter (issue 36): its multiplicative forms rescale the whole weight
(W* = T·W0), so it is never summed with another adapter on one layer."""

import modapt
import pytest
import torch
from modapt.testing.conformance import model_output, perturb
from modapt.testing.models import tiny_inputs, tiny_llama

LORMA = {"method": "lorma", "targets": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 4.0}


@pytest.fixture
def dora_registry(registry):
    modapt_dora = pytest.importorskip("modapt_dora.plugin")
    registry.register_plugin(modapt_dora, name="dora", distribution="modapt-dora")
    return registry


@pytest.mark.parametrize("inflation", ["plus", "pi", "none"])
def test_lorma_and_dora_on_one_layer_are_refused(dora_registry, inflation):
    model = modapt.apply(tiny_llama().eval(), {"adapter": [dict(LORMA, inflation=inflation)]}, name="lorma",
                         registry=dora_registry)
    modapt.apply(model, {"adapter": [{"method": "dora", "targets": ["q_proj"], "update": {"method": "lora", "r": 4}}]},
                 name="dora", registry=dora_registry)
    with pytest.raises(modapt.StateError, match=r"q_proj'.*adapter '(lorma|dora)'.*adapter '(dora|lorma)'"):
        modapt.set_active(model, ["lorma", "dora"])
    assert modapt.active(model) == ["lorma"]


def test_lorma_beside_lora_on_other_layers_sums(registry):
    """A LoRA on other layers than LoRMA's is active with it: equal to one recipe holding both."""
    lora = {"method": "lora", "targets": ["up_proj"], "r": 4}
    both = modapt.apply(tiny_llama().eval(), {"adapter": [LORMA, lora]}, registry=registry)
    perturb(both, seed=2)
    multi = modapt.apply(tiny_llama().eval(), {"adapter": [LORMA]}, name="lorma", registry=registry)
    modapt.apply(multi, {"adapter": [lora]}, name="lora", registry=registry)
    with torch.no_grad():
        live = dict(multi.named_parameters())
        for key, value in modapt.adapter_state_dict(both).items():
            live[key.replace("up_proj.", "up_proj.modapt_adapters.lora.")].copy_(value)
    modapt.apply(multi, {"adapter": [lora | {"targets": ["q_proj"]}]}, name="q", registry=registry)
    with pytest.raises(modapt.StateError, match=r"q_proj': adapter 'lorma' \(lorma\) rescales the whole weight"):
        modapt.set_active(multi, ["lorma", "q"])  # a LoRA on LoRMA's layer: T·W0 + ΔW is no sum of updates
    modapt.set_active(multi, ["lorma", "lora"])
    inputs = tiny_inputs(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model_output(multi, inputs), model_output(both, inputs), atol=1e-5, rtol=0)
