"""LoMAP vs LoRA: training-step time and peak memory, as ratios, for a LLaMA of a given size.

One step = forward + backward + ``modapt.before_optimizer_step`` + AdamW step + zero_grad, on
a randomly initialised LLaMA built from a config (no download), causal-LM loss on random ids.
Both methods adapt the same layers with the same LoRA update; LoMAP is ``map`` over it with
the default options. Time: median (and best) over ``--steps`` timed steps after ``--warmup``;
the two models live side by side and their timed steps alternate, so that a busy machine's
drift affects both alike. Peak
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
import statistics
import time

import modapt
import torch
from modapt.testing.memory import peak_bytes

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


class Run:
    """One adapted model with its optimizer and a fixed batch; ``step()`` is one training step."""

    def __init__(self, entry: dict, args, device, dtype):
        self.model = build(args.size, device, dtype)
        modapt.apply(self.model, {"adapter": [entry]})
        self.model.train()
        self.opt = torch.optim.AdamW(modapt.trainable_parameters(self.model).values(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, self.model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        self.count = 0
        self.times: list[float] = []

    def step(self) -> None:
        out = self.model(input_ids=self.ids, labels=self.ids)
        out.loss.backward()
        modapt.before_optimizer_step(self.model, self.count)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.count += 1

    def resident_bytes(self) -> int:
        """What lives across steps: weights, buffers, adapter parameters, Adam state."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_bytes(run: Run, device) -> int:
    """Memory allocated during one step above what was allocated before it."""
    return peak_bytes(run.step, device)


def measure(entries: dict[str, dict], args, device, dtype) -> dict[str, dict[str, float]]:
    """Both methods side by side; timed steps alternate between them so that drift hits both."""
    runs = {label: Run(entry, args, device, dtype) for label, entry in entries.items()}
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    sync(device)
    for _ in range(args.steps):
        for run in runs.values():
            t0 = time.perf_counter()
            run.step()
            sync(device)
            run.times.append(time.perf_counter() - t0)
    results = {}
    for label, run in runs.items():
        peak = peak_step_bytes(run, device)
        results[label] = {"time": statistics.median(run.times), "best": min(run.times), "peak": peak,
                          "total": run.resident_bytes() + peak,
                          "params": sum(p.numel() for p in modapt.trainable_parameters(run.model).values())}
    return results


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
    results = measure(entries, args, device, dtype)
    print("| method | trainable params | step time, median (ms) | best (ms) | peak step memory (MiB) "
          "| resident + peak (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['params']:,} | {r['time'] * 1e3:.1f} | {r['best'] * 1e3:.1f} | "
              f"{r['peak'] / 2**20:.1f} | {r['total'] / 2**20:.1f} |")
    lo, lm = results["lora"], results["lomap"]
    print(f"\nLoMAP/LoRA step-time ratio: {lm['time'] / lo['time']:.3f} (median), "
          f"{lm['best'] / lo['best']:.3f} (best)")
    print(f"LoMAP/LoRA peak-memory ratio (memory allocated during a step): {lm['peak'] / lo['peak']:.3f}")
    print(f"LoMAP/LoRA peak-memory ratio (resident weights and optimizer state + step peak): "
          f"{lm['total'] / lo['total']:.3f}")


if __name__ == "__main__":
    main()
