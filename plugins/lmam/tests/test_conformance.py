"""LMAM, alone and beside LoRA, passes the conformance suite on tiny LLaMA, GPT-2 and BERT."""

from typing import ClassVar

import modapt_lmam.plugin
from modapt.testing.conformance import MethodConformance


class TestLmamConformance(MethodConformance):
    plugins: ClassVar[dict] = {"lmam": modapt_lmam.plugin}
    recipes: ClassVar[dict] = {
        # tiny_inputs are 8 tokens: n < N, n > N (cropped), tail alignment; h_s < h and h_s = h
        "llama": {"adapter": [{"method": "lmam", "heads": 2, "r": 2, "n": 6}]},
        "gpt2": {"adapter": [{"method": "lmam", "heads": 4, "r": 2, "n": 12, "scale": 0.5}]},
        "bert": {"adapter": [{"method": "lmam", "heads": 1, "r": 1, "n": 4, "align": "tail"}],
                 "modules_to_save": ["classifier"]},
    }


class TestLoraLmamConformance(MethodConformance):
    """LoRA beside LMAM, with an FMAM variant on BERT.

    LoRA sits outside the attention modules here: the suite's key check reads every adapter
    parameter under an attachment's path as the attachment's own, so a LoRA layer inside
    ``self_attn`` would be misread (test_attachment.py covers LoRA on q_proj/v_proj + LMAM).
    """

    plugins: ClassVar[dict] = {"lmam": modapt_lmam.plugin}
    recipes: ClassVar[dict] = {
        "llama": {"adapter": [{"method": "lora", "r": 2, "lora_alpha": 4.0, "targets": ["up_proj", "down_proj"]},
                              {"method": "lmam", "heads": 4, "r": 2, "n": 6}]},
        "gpt2": {"adapter": [{"method": "lora", "r": 2, "targets": ["mlp.c_fc"]},
                             {"method": "lmam", "heads": 2, "r": 2, "n": 6, "position": False}]},
        "bert": {"adapter": [{"method": "lora", "r": 2, "targets": ["intermediate.dense"]},
                             {"method": "lmam", "heads": 2, "n": 6, "full_rank": True}]},
    }
