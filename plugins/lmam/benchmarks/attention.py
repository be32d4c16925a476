"""Attention-layer time and memory: base attention vs base + LMAM.

One LLaMA attention layer (q/k/v/o projections, RoPE, the model's SDPA attention), inference
forward, batch 1, unpadded, causal. Each model gets the mask its own config builds (for SDPA
and an unpadded batch that is ``None``: SDPA's ``is_causal`` path, for both). Base and LMAM
runs are interleaved and the median is reported, so a noisy machine hurts both alike.

    python plugins/lmam/benchmarks/attention.py                      # CPU, fp32
    python plugins/lmam/benchmarks/attention.py --device cuda        # bf16, synchronize, max_memory_allocated

Memory is the peak of what the forward allocates above what was allocated before it
(CUDA: ``max_memory_allocated``; CPU: the running sum of the profiler's allocation events).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from modapt.testing.memory import peak_bytes
from torch import nn


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="N, the sequence lengths")
    p.add_argument("--ns", type=int, nargs="+", default=[128, 512], help="n, LMAM's map lengths")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 4096 on CUDA, 512 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = heads)")
    p.add_argument("--lmam-heads", type=int, default=None, help="h_s (default: = heads)")
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 20 CUDA, 7 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main():
    args = parse()
    import modapt
    import modapt_lmam.plugin
    from modapt.registry import Registry
    from transformers import LlamaConfig, masking_utils
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    hidden = args.hidden or (4096 if cuda else 512)
    heads = args.heads or (32 if cuda else 8)
    kv_heads = args.kv_heads or heads
    repeats = args.repeats or (20 if cuda else 7)
    registry = Registry(autoload=False)
    registry.register_plugin(modapt_lmam.plugin, name="lmam", distribution="modapt-lmam")

    def config():
        return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           intermediate_size=hidden, max_position_embeddings=max(args.lengths),
                           attn_implementation="sdpa")

    torch.manual_seed(0)
    base_cfg = config()
    base = nn.Module()
    base.attn = LlamaAttention(base_cfg, layer_idx=0).to(device, dtype).eval()
    rotary = LlamaRotaryEmbedding(base_cfg).to(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{dtype}, hidden {hidden}, heads {heads}, kv heads {kv_heads}, batch {args.batch}, "
          f"median of {repeats}; torch {torch.__version__}")
    print("| N | n | base ms | LMAM ms | overhead | base peak MiB | LMAM peak MiB | extra MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.ns:
        holder = nn.Module()
        lmam_cfg = config()
        holder.attn = LlamaAttention(lmam_cfg, layer_idx=0)
        holder.attn.load_state_dict(base.attn.state_dict())
        holder.to(device, dtype).eval()
        recipe = {"adapter": [{"method": "lmam", "n": n, "r": args.r, "heads": args.lmam_heads or heads,
                               "init": "random"}]}
        modapt.apply(holder, recipe, registry=registry)
        for length in args.lengths:
            x = torch.randn(args.batch, length, hidden, device=device, dtype=dtype)
            positions = torch.arange(length, device=device)[None]
            emb = rotary(x, positions)
            masks = [masking_utils.create_causal_mask(cfg, x, None, None, positions) for cfg in (base_cfg, lmam_cfg)]
            runs = [lambda: base.attn(x, emb, masks[0]), lambda: holder.attn(x, emb, masks[1])]
            times = ([], [])
            with torch.no_grad():
                for run in runs:
                    run()  # warm-up
                for _ in range(repeats):
                    for i, run in enumerate(runs):
                        times[i].append(timed(run, device))
                peaks = [peak_bytes(run, device) / 2**20 for run in runs]
            t_base, t_lmam = (statistics.median(t) * 1e3 for t in times)
            print(f"| {length} | {n} | {t_base:.2f} | {t_lmam:.2f} | {100 * (t_lmam / t_base - 1):+.1f}% | "
                  f"{peaks[0]:.1f} | {peaks[1]:.1f} | {peaks[1] - peaks[0]:+.1f} |", flush=True)
            del x, emb, masks
        del holder


if __name__ == "__main__":
    main()
