"""LoRA, the reference method, passes the conformance suite on tiny LLaMA, GPT-2 and BERT."""

from modapt.testing.conformance import MethodConformance


class TestLoraConformance(MethodConformance):
    plugins = {}
    recipes = {
        "llama": {"adapter": [{"method": "lora", "r": 4, "lora_alpha": 8.0, "dropout": 0.1,
                               "targets": ["q_proj", "v_proj", "down_proj", "embed_tokens"]}]},
        "gpt2": {"adapter": [{"method": "lora", "r": 4, "lora_alpha": 16.0, "targets": ["c_attn", "c_fc", "c_proj"]}]},
        "bert": {"adapter": [{"method": "lora", "r": 2, "targets": ["query", "value", "word_embeddings"]}],
                 "modules_to_save": ["classifier"]},
    }
