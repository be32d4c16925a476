"""Loads /tmp/fid/side.pt (from adapterhub_side.py), applies the equivalent modapt recipes to the same
base weights, copies the adapter weights and prints the logit differences (README figures)."""
import torch, modapt, modapt_bottleneck.plugin
from transformers import LlamaConfig, LlamaForCausalLM, GPT2Config, GPT2LMHeadModel, BertConfig, BertForMaskedLM
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, attn_implementation="eager")
archs = {"llama": (LlamaForCausalLM, cfg),
 "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=0, attn_implementation="eager")),
 "bert": (BertForMaskedLM, BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, max_position_embeddings=256, pad_token_id=0, attn_implementation="eager"))}
data = torch.load("/tmp/fid/side.pt")
recipes = {"houlsby": {"placement": "series", "activation": "swish", "reduction_factor": 16},
           "pfeiffer": {"placement": "pfeiffer", "activation": "relu", "reduction_factor": 16},
           "parbn": {"placement": "ffn", "input": "residual", "activation": "relu", "reduction_factor": 2, "scale": 4.0}}
for (arch, name), d in data.items():
    cls, c = archs[arch]
    model = cls(c)
    missing = model.load_state_dict(d["base"], strict=False)
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=d["ids"], **({} if arch == "bert" else {"use_cache": False})).logits
    modapt.apply(model, {"adapter": [{"method": "bottleneck", **recipes[name]}]})
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in d["adapter"].items():
            site = "attn" if ("attention_adapters" in k or ".attention.output.adapters" in k) else "ffn"
            layer = k.split(".adapters.a.")[0].rsplit(".", 1)[0]
            if arch == "bert":
                full = k.split(".adapters.a.")[0]
                layer = full[:-len(".attention.output")] if site == "attn" else full[:-len(".output")]
            part = "down" if "adapter_down" in k else "up"
            sd[f"{layer}.adapter_{site}.{part}.{k.rsplit('.', 1)[1]}"].copy_(v)
        got = model(input_ids=d["ids"], **({} if arch == "bert" else {"use_cache": False})).logits
    ref = d["logits"]
    print(f"{arch} {name}: max|modapt - adapters| = {(got - ref).abs().max():.2e}, relative {((got-ref).norm()/ref.norm()):.2e}; "
          f"adapter moves logits by {(ref - plain).abs().max():.2e}")
