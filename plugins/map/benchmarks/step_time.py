"""LoMAP vs LoRA: training-step time and peak memory, as ratios, for a LLaMA of a given size.

One step = forward + backward + ``modapt.before_optimizer_step`` + AdamW step + zero_grad, on
a randomly initialised LLaMA built from a config (no download), causal-LM loss on random ids.
Both methods adapt the same layers with the same LoRA update; LoMAP is ``map`` over it with
the default options. Time: median over ``--steps`` timed steps after ``--warmup``. Peak
memory: the most memory allocated during one step above what was allocated before it
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the profiler's allocation events), and the
same plus what lives across steps (weights, buffers, adapter parameters, Adam state).

CPU (here)::

    python plugins/map/benchmarks/step_time.py --size small
CUDA (bf16 base, fp32 adapters)::

    python plugins/map/benchmarks/step_time.py --size 1b --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import modapt

SIZES = {  # LlamaConfig fields
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),  # SmolLM2-135M's shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),  # Llama-3.2-1B's shapes
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(fn) -> int:
    """Peak of (bytes allocated − bytes freed) while ``fn()`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure(label: str, entry: dict, args, device, dtype) -> dict[str, float]:
    model = build(args.size, device, dtype)
    modapt.apply(model, {"adapter": [entry]})
    model.train()
    opt = torch.optim.AdamW(modapt.trainable_parameters(model).values(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    counter = {"step": 0}

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        modapt.before_optimizer_step(model, counter["step"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter["step"] += 1

    for _ in range(args.warmup):
        step()
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    # what lives across steps: weights, buffers, adapter parameters, Adam state
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    resident += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if torch.is_tensor(v))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = cpu_peak_bytes(step)
    n_trainable = sum(p.numel() for p in modapt.trainable_parameters(model).values())
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"time": statistics.median(times), "peak": peak, "total": resident + peak, "params": n_trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description="LoMAP/LoRA step-time and peak-memory ratios")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="base dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    lora = {"method": "lora", "r": args.r, "lora_alpha": float(2 * args.r)}
    entries = {
        "lora": {**lora, "targets": TARGETS},
        "lomap": {"method": "map", "targets": TARGETS, "update": lora},
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"LLaMA '{args.size}' {SIZES[args.size]}, batch {args.batch}, seq {args.seq}, r {args.r}, "
          f"{dtype} base on {device_name}, torch {torch.__version__}")
    results = {label: measure(label, entry, args, device, dtype) for label, entry in entries.items()}
    print("| method | trainable params | step time (ms) | peak step memory (MiB) | resident + peak (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['params']:,} | {r['time'] * 1e3:.1f} | {r['peak'] / 2**20:.1f} | "
              f"{r['total'] / 2**20:.1f} |")
    lo, lm = results["lora"], results["lomap"]
    print(f"\nLoMAP/LoRA step-time ratio: {lm['time'] / lo['time']:.3f}")
    print(f"LoMAP/LoRA peak-memory ratio (memory allocated during a step): {lm['peak'] / lo['peak']:.3f}")
    print(f"LoMAP/LoRA peak-memory ratio (resident weights and optimizer state + step peak): "
          f"{lm['total'] / lo['total']:.3f}")


if __name__ == "__main__":
    main()
