"""AdaLoRA passes the conformance suite on tiny LLaMA, GPT-2 (Conv1D) and BERT."""

from typing import ClassVar

import modapt_adalora.plugin
from modapt.testing.conformance import MethodConformance

SCHEDULE = {"init_r": 6, "target_r": 2, "total_step": 20, "tinit": 2, "tfinal": 4}


class TestAdaLoraConformance(MethodConformance):
    plugins: ClassVar[dict] = {"adalora": modapt_adalora.plugin}
    recipes: ClassVar[dict] = {
        "llama": {"adapter": [{"method": "adalora", "targets": ["q_proj", "v_proj", "down_proj"], "dropout": 0.1,
                               **SCHEDULE}]},
        "gpt2": {"adapter": [{"method": "adalora", "targets": ["c_attn", "c_proj"], "lora_alpha": 16.0, **SCHEDULE}]},
        "bert": {"adapter": [{"method": "adalora", "targets": ["query", "value"], **SCHEDULE}],
                 "modules_to_save": ["classifier"]},
    }
