"""Timing a training step of adapted LLaMA-shaped models: shared by the plugins' benchmark scripts.

A script gives its recipes and this module builds the model from a config (random weights, no
download), times forward + backward + AdamW step (CUDA-synchronised; bf16 base on CUDA, fp32 on
CPU) and prints one row per recipe. The repository-level comparison with PEFT is
``benchmarks/train_step.py``; these scripts compare a plugin's methods with LoRA.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import modapt


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the model-shape and timing options every script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    return p


def build_llama(args, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM of the shape in ``args`` with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(args.seq, 128))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], device: torch.device, warmup: int,
               steps: int) -> tuple[list[float], int | None]:
    """Run ``step()`` ``warmup`` times, then time ``steps`` calls, CUDA-synchronised.

    Returns the seconds of each timed call and the peak bytes allocated during them (CUDA
    ``max_memory_allocated`` after a reset; ``None`` on other devices).
    """
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak


def measure(model, args, device: torch.device) -> tuple[float, float, int]:
    """(mean step seconds after warm-up, peak GiB on CUDA or NaN, trainable parameter count)."""
    params = list(modapt.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sum(times) / len(times), peak, sum(p.numel() for p in params)


def run(args, registry: modapt.Registry, recipes: dict[str, dict],
        build: Callable = build_llama) -> list[tuple[str, int, float, float]]:
    """Time every recipe on a fresh model and print the table; returns (name, trainable, ms, GiB) rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device}, base dtype {dtype}, hidden {args.hidden}, layers {args.layers}, "
          f"batch {args.batch} x seq {args.seq}")
    width = max([24] + [len(n) + 2 for n in recipes])
    print(f"{'recipe':<{width}}{'trainable':>12}{'step ms':>10}{'peak GiB':>10}")
    rows = []
    for name, recipe in recipes.items():
        model = modapt.apply(build(args, device, dtype), recipe, registry=registry)
        model.train()
        step, peak, count = measure(model, args, device)
        print(f"{name:<{width}}{count:>12,}{step * 1e3:>10.1f}{peak:>10.2f}")
        rows.append((name, count, step * 1e3, peak))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
