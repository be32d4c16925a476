"""Training-step time and peak memory of bottleneck adapters (3 placements) against LoRA.

Random weights from a config (no download). CPU: float32; CUDA: bfloat16 base (adapters in
float32, as modapt does by default). Prints one table row per recipe.

    python plugins/bottleneck/benchmarks/step_time.py                  # CPU smoke (tiny)
    python plugins/bottleneck/benchmarks/step_time.py --hidden 4096 --intermediate 11008 \
        --layers 4 --seq 1024 --batch 4 --rank 16                       # GPU figures
"""

from __future__ import annotations

import argparse
import time

import modapt
import modapt.lora
import modapt_bottleneck.plugin
import torch


def recipes(args):
    out = {f"lora r={args.rank}": {"adapter": [{"method": "lora", "r": args.rank, "targets": ["q_proj", "v_proj"]}]}}
    for placement in ("series", "parallel", "ffn"):
        out[f"bottleneck {placement} r={args.rank}"] = {"adapter": [
            {"method": "bottleneck", "placement": placement, "r": args.rank}]}
    return out


def build(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(args.seq, 128))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, args, device):
    params = list(modapt.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sum(times) / len(times), peak, sum(p.numel() for p in params)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    registry = modapt.Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    registry.register_plugin(modapt_bottleneck.plugin, name="bottleneck", distribution="modapt-bottleneck")
    print(f"device {device}, base dtype {dtype}, hidden {args.hidden}, layers {args.layers}, "
          f"batch {args.batch} x seq {args.seq}")
    print(f"{'recipe':<30}{'trainable':>12}{'step ms':>10}{'peak GiB':>10}")
    for name, recipe in recipes(args).items():
        model = modapt.apply(build(args, device, dtype), recipe, registry=registry)
        model.train()
        step, peak, count = measure(model, args, device)
        print(f"{name:<30}{count:>12,}{step * 1e3:>10.1f}{peak:>10.2f}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
