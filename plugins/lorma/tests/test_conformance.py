"""The core's conformance suite on tiny LLaMA, GPT-2 and BERT; each family exercises other options."""

from typing import ClassVar

import modapt_lorma.plugin
from modapt.testing.conformance import MethodConformance


class TestLormaConformance(MethodConformance):
    plugins: ClassVar[dict] = {"lorma": modapt_lorma.plugin}
    recipes: ClassVar[dict] = {
        # the paper's LLaMA setting (U, D, O, G: non-square up/down) plus q, v; LoRMA+ pre
        "llama": {"adapter": [{"method": "lorma", "targets": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                               "r": 4, "lora_alpha": 4.0}]},
        # GPT-2's fused c_attn (Conv1D, [in, out] storage) with LoRMAπ through the FFT path
        "gpt2": {"adapter": [{"method": "lorma", "targets": ["c_attn", "c_fc"], "r": 4, "lora_alpha": 8.0,
                              "inflation": "pi", "pi_path": "fft"}]},
        # RoBERTa-like query/value with post-multiplication (paper Table 7)
        "bert": {"adapter": [{"method": "lorma", "targets": ["query", "value"], "r": 4, "side": "post"}],
                 "modules_to_save": ["classifier"]},
    }
