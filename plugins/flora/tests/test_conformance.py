"""FLoRA passes the conformance suite on tiny LLaMA, GPT-2 (Conv1D) and BERT."""

from typing import ClassVar

import modapt_flora.plugin
from modapt.testing.conformance import MethodConformance


class TestFloraConformance(MethodConformance):
    plugins: ClassVar[dict] = {"flora": modapt_flora.plugin}
    recipes: ClassVar[dict] = {
        "llama": {"adapter": [{"method": "flora", "r": 4, "lora_alpha": 8.0, "dropout": 0.1,
                               "targets": ["q_proj", "v_proj", "down_proj"]}]},
        "gpt2": {"adapter": [{"method": "flora", "r": 4, "lora_alpha": 16.0, "targets": ["c_attn", "c_fc", "c_proj"]}]},
        "bert": {"adapter": [{"method": "flora", "r": 2, "targets": ["query", "value"]}],
                 "modules_to_save": ["classifier"]},
    }
