"""DoRA (over LoRA, the default update) passes the conformance suite on tiny LLaMA, GPT-2, BERT."""

import modapt_dora.plugin
from modapt.testing.conformance import MethodConformance


class TestDoraConformance(MethodConformance):
    plugins = {"dora": modapt_dora.plugin}
    recipes = {
        "llama": {"adapter": [{"method": "dora", "targets": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
                               "update": {"method": "lora", "r": 4, "lora_alpha": 8.0, "dropout": 0.1}}]},
        "gpt2": {"adapter": [{"method": "dora", "targets": ["c_attn", "c_fc", "c_proj"],
                              "update": {"method": "lora", "r": 4, "lora_alpha": 16.0}}]},
        # no update table: LoRA with its defaults
        "bert": {"adapter": [{"method": "dora", "targets": ["query", "value", "word_embeddings"]}],
                 "modules_to_save": ["classifier"]},
    }
