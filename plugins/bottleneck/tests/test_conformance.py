"""Bottleneck adapters pass the conformance suite on tiny LLaMA, GPT-2 and BERT (one placement each)."""

from typing import ClassVar

import modapt_bottleneck.plugin
from modapt.testing.conformance import MethodConformance


class TestBottleneckConformance(MethodConformance):
    plugins: ClassVar[dict] = {"bottleneck": modapt_bottleneck.plugin}
    recipes: ClassVar[dict] = {
        # default targets: every decoder layer
        "llama": {"adapter": [{"method": "bottleneck", "placement": "series", "r": 8, "dropout": 0.1}]},
        "gpt2": {"adapter": [{"method": "bottleneck", "placement": "parallel", "r": 4, "activation": "gelu"}]},
        "bert": {"adapter": [{"method": "bottleneck", "placement": "ffn", "r": 4, "scale": 2.0,
                              "targets": ["BertLayer"]}],
                 "modules_to_save": ["classifier"]},
    }

