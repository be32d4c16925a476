"""Side of the AdapterHub comparison that runs with `adapters` 1.3.0 (transformers 4.57): see the README.

Builds tiny LLaMA, GPT-2 and BERT models, adds DoubleSeqBn (Houlsby), SeqBn (Pfeiffer) and ParBn
adapters with random weights, and saves base weights, adapter weights, inputs and logits to
/tmp/fid/side.pt for adapterhub_compare.py (run in the modapt environment).
"""
import torch, adapters, transformers
from transformers import LlamaConfig, LlamaForCausalLM, GPT2Config, GPT2LMHeadModel, BertConfig, BertForMaskedLM
from adapters import DoubleSeqBnConfig, SeqBnConfig, ParBnConfig
print("transformers", transformers.__version__, "adapters", adapters.__version__)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, attn_implementation="eager")
archs = {"llama": (LlamaForCausalLM, cfg),
 "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=0, attn_implementation="eager")),
 "bert": (BertForMaskedLM, BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, max_position_embeddings=256, pad_token_id=0, attn_implementation="eager"))}
out = {}
for arch, (cls, cfg) in archs.items():
 for name, conf in [("houlsby", DoubleSeqBnConfig()), ("pfeiffer", SeqBnConfig()), ("parbn", ParBnConfig())]:
     torch.manual_seed(0)
     model = cls(cfg)
     base = {k: v.clone() for k, v in model.state_dict().items()}
     adapters.init(model)
     model.add_adapter("a", config=conf)
     model.set_active_adapters("a")
     g = torch.Generator().manual_seed(5)
     ad = {}
     with torch.no_grad():
         for k, p in model.named_parameters():
             if ".adapters.a." in k:
                 p.copy_(torch.randn(p.shape, generator=g) * 0.3); ad[k] = p.detach().clone()
     model.eval()
     ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))
     with torch.no_grad():
         logits = model(input_ids=ids, **({} if arch == "bert" else {"use_cache": False})).logits
     out[(arch, name)] = {"base": base, "adapter": ad, "ids": ids, "logits": logits}
     print(name, sorted(ad)[:4])
torch.save(out, "/tmp/fid/side.pt")
