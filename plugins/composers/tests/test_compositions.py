"""Compositions no paper tried but the families allow: each applies, trains and merges.

(The mixed recipe with weight, attention and module adapters, saved, reloaded and merged, is the
``lora+adapter-ffn+lmam`` preset in test_presets.py.)
"""

from __future__ import annotations

import modapt
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama

UNTRIED = {
    "map over lorma": ({"adapter": [{"method": "map", "targets": ["q_proj", "v_proj"],
                                     "update": {"method": "lorma", "r": 4}}]}, ("map", "lorma")),
    "dora over quanta": ({"adapter": [{"method": "dora", "targets": ["q_proj", "v_proj"],
                                       "update": {"method": "quanta", "num_axes": 3}}]}, ("dora", "quanta")),
    "lmam with lorma": ({"adapter": [{"method": "lorma", "targets": ["o_proj", "up_proj"], "r": 4},
                                     {"method": "lmam", "r": 2, "n": 16}]}, ("lorma", "lmam")),
}


@pytest.mark.parametrize("name", sorted(UNTRIED))
def test_untried_composition_trains_and_merges(name, registry, helpers):
    recipe, methods = UNTRIED[name]
    helpers.need(registry, *methods)
    model = modapt.apply(tiny_llama(seed=0), recipe, registry=registry)
    trainable = modapt.trainable_parameters(model)
    # both methods own parameters in the model, and both receive gradients
    for method in methods:
        keys = registry.method(method).own_keys
        assert any(any(k.endswith(own) or f".{own.split('.')[0]}" in k for own in keys) for k in trainable), method
    before, after = helpers.train(model)
    assert after < before - 0.05, f"{name}: loss {before:.4f} -> {after:.4f}"
    batch = tiny_inputs()
    expected = helpers.logits(model, batch)
    modapt.merge(model, unload=True)
    assert not any(isinstance(m, modapt.AdaptedLayer) for m in model.modules())
    torch.testing.assert_close(helpers.logits(model, batch), expected, atol=1e-5, rtol=1e-5)
