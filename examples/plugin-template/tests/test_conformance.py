"""IA3 passes modapt's conformance suite, and its forward is the formula written out."""

import torch

import modapt
import modapt_ia3.plugin
from modapt.testing.conformance import MethodConformance


class TestIa3Conformance(MethodConformance):
    plugins = {"ia3": modapt_ia3.plugin}
    recipes = {
        "llama": {"adapter": [{"method": "ia3", "targets": ["k_proj", "v_proj"]},
                              {"method": "ia3", "side": "input", "targets": ["down_proj"]}]},
        "gpt2": {"adapter": [{"method": "ia3", "targets": ["c_attn"]},
                             {"method": "ia3", "side": "input", "targets": ["mlp.c_proj"]}]},
        "bert": {"adapter": [{"method": "ia3", "targets": ["key", "value"]}]},
    }


def test_forward_is_the_formula(modapt_registry):
    modapt_registry.register_plugin(modapt_ia3.plugin, name="ia3", distribution="modapt-ia3")
    for side in ("output", "input"):
        layer = torch.nn.Linear(6, 4)
        model = torch.nn.Sequential(layer)
        modapt.apply(model, {"adapter": [{"method": "ia3", "side": side, "targets": ["0"]}]})
        host = model[0]
        with torch.no_grad():
            host.ia3_l.uniform_(0.5, 1.5)
        x = torch.randn(3, 6)
        w0, b, l = host.base_layer.weight, host.base_layer.bias, host.ia3_l
        expected = x @ (l[:, None] * w0).t() + b if side == "output" else x @ (w0 * l[None, :]).t() + b
        torch.testing.assert_close(host(x), expected)
