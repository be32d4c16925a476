"""``modapt.combine`` of embedding LoRAs against PEFT 0.21's ``add_weighted_adapter`` on the same
weights (issue 36): linear, cat and svd, checked on the logits (1e-5)."""

import pytest
import torch

import modapt
import modapt.lora
from modapt.registry import Registry, use_registry
from modapt.testing.conformance import model_output, perturb
from modapt.testing.models import tiny_inputs, tiny_llama

X = {"method": "lora", "targets": ["embed_tokens", "q_proj"], "r": 4, "lora_alpha": 8.0}
Y = {"method": "lora", "targets": ["embed_tokens", "q_proj"], "r": 4, "lora_alpha": 4.0}


@pytest.fixture(scope="module")
def registry():
    registry = Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    with use_registry(registry):
        yield registry


@pytest.fixture(scope="module")
def pair(registry):
    """One base holding two embedding+q_proj LoRAs "x" and "y", and PEFT's model with the same tensors."""
    from peft import LoraConfig, get_peft_model

    ours = modapt.apply(tiny_llama().eval(), {"adapter": [X]}, name="x", registry=registry)
    modapt.apply(ours, {"adapter": [Y]}, name="y", registry=registry)
    perturb(ours, seed=5)  # every adapter tensor random (the embedding's A starts at zero)
    peft_model = get_peft_model(tiny_llama().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=X["targets"]),
                                adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=4, lora_alpha=4, target_modules=Y["targets"]))
    live = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in ours.named_parameters():
            if ".lora_" not in key:
                continue
            path, _, own = key.rpartition(".lora_")
            name = "x"
            if ".modapt_adapters.y" in path:
                path, name = path.replace(".modapt_adapters.y", ""), "y"
            factor = own.split(".")[0]
            if path.endswith("embed_tokens"):  # PEFT: lora_embedding_A [r, vocab], lora_embedding_B [dim, r]
                live[f"base_model.model.{path}.lora_embedding_{factor}.{name}"].copy_(value)
            else:
                live[f"base_model.model.{path}.lora_{factor}.{name}.weight"].copy_(value)
    return ours, peft_model


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_combine_embedding_loras_matches_peft(pair, how):
    ours, peft_model = pair
    weights = {"x": 0.6, "y": -0.9}
    modapt.combine(ours, weights, name=how, how=how)
    peft_model.add_weighted_adapter(list(weights), list(weights.values()), how, combination_type=how)
    modapt.set_active(ours, how)
    peft_model.set_adapter(how)
    inputs = tiny_inputs(batch=2)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        torch.testing.assert_close(model_output(ours, inputs), expected, atol=1e-5, rtol=0)
        modapt.set_active(ours, "x")  # and the combination is not the first adapter alone
        assert (model_output(ours, inputs) - expected).abs().max() > 1e-3
    modapt.delete(ours, how)
