"""VeRA passes the conformance suite on tiny LLaMA, GPT-2 (Conv1D) and BERT."""

from typing import ClassVar

import modapt_vera.plugin
from modapt.testing.conformance import MethodConformance


class TestVeraConformance(MethodConformance):
    plugins: ClassVar[dict] = {"vera": modapt_vera.plugin}
    recipes: ClassVar[dict] = {
        "llama": {"adapter": [{"method": "vera", "r": 16, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"]}]},
        "gpt2": {"adapter": [{"method": "vera", "r": 8, "projection_prng_key": 7, "targets": ["c_attn", "c_fc"]}]},
        "bert": {"adapter": [{"method": "vera", "r": 4, "targets": ["query", "value"]}],
                 "modules_to_save": ["classifier"]},
    }
