"""LoMAP + LMAM training steps under DDP and FSDP2: step time, tokens/s and peak memory per GPU.

    # two GPUs (NCCL; NVLink multicast off):
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/distributed_step.py --size 1b
    # one GPU, one process (a process group of one: the same code path, no communication to speak of):
    torchrun --standalone --nproc-per-node 1 benchmarks/distributed_step.py --size 1b
    # CPU smoke (2 gloo processes, tiny model; the test suite runs this):
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_step.py --size tiny --steps 2 --warmup 1

Without torchrun (plain ``python benchmarks/distributed_step.py``) it makes a process group of
one itself. The model is LLaMA-shaped with random weights built from a config (no downloads):
``1b`` is hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632 (TinyLlama's shape).
The recipe is LoMAP (MAP over LoRA r=16) on q, k, v, o, gate, up, down plus LMAM on every
attention layer. The base is bf16, adapter parameters fp32 (modapt's autocast_adapter_dtype), as
under DDP; FSDP2 runs with ``MixedPrecisionPolicy(reduce_dtype=fp32)``: its all-gather takes the
mixed bf16/fp32 groups as they are (torch 2.13), its reduce-scatter needs one gradient dtype,
which fp32 gives; ``--fsdp-param-dtype bf16`` casts the adapters to bf16 for compute instead.
MAP's 0-dim scalars are replicated and averaged in fp32 (:func:`modapt.distributed.shard_decoder`). A step is forward + backward + the modapt hooks +
AdamW step, synchronised; the median over ``--steps`` after ``--warmup``. ``--batch`` is per rank,
tokens/s counts the global batch. Rank 0 prints one line per engine and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, batch=2, seq=32, lmam_n=16),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=4, seq=1024, lmam_n=128),
}


def recipe(r: int, lmam_n: int) -> dict:
    lora = {"method": "lora", "r": r, "lora_alpha": float(2 * r)}
    return {"adapter": [{"method": "map", "targets": LINEAR, "update": lora},
                        {"method": "lmam", "r": 2, "n": lmam_n}]}


def setup_process_group() -> tuple[int, int, torch.device]:
    """torchrun's group if launched by it, else a group of one; (rank, world, device)."""
    if "RANK" not in os.environ:  # plain python: a group of one on a free port
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from modapt import distributed

    distributed.init_from_env()
    rank = dist.get_rank()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    return rank, dist.get_world_size(), device


def build(size: str, device: torch.device, dtype: torch.dtype, r: int):
    import modapt
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in SIZES[size].items() if k not in ("batch", "seq", "lmam_n")}
    config = LlamaConfig(**cfg, max_position_embeddings=4096, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)  # the same weights on every rank (DDP checks; FSDP2 shards the same tensor)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    modapt.apply(model, recipe(r, SIZES[size]["lmam_n"]))
    model.train()
    return model


def wrap(model, engine: str, device: torch.device, param_dtype: torch.dtype | None):
    from modapt import distributed

    if engine == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    return distributed.shard_decoder(model, mp_policy=mp)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(engine: str, args, rank: int, world: int, device: torch.device) -> dict:
    import modapt

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    batch, seq = args.batch or SIZES[args.size]["batch"], args.seq or SIZES[args.size]["seq"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(args.size, device, dtype, args.rank)
    trainable = sum(p.numel() for p in modapt.trainable_parameters(model).values())
    wrapped = wrap(model, engine, device, torch.bfloat16 if args.fsdp_param_dtype == "bf16" else None)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    vocab = SIZES[args.size]["vocab_size"]
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        synchronize(device)
        start = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids).loss + modapt.regularization_loss(model)
        loss.backward()
        modapt.before_optimizer_step(model, step)
        optimizer.step()
        modapt.after_optimizer_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        peak_kind = "max_memory_allocated"
    else:  # ru_maxrss: KiB on Linux; the process's whole life, not this engine alone
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_kind = "ru_maxrss (process)"
    peaks = [None] * world
    dist.all_gather_object(peaks, round(peak, 3))
    final_loss = float(loss.detach().float())
    del wrapped, model, optimizer
    return {"engine": engine, "world": world, "batch_per_rank": batch, "seq": seq, "step_ms": 1000 * step_s,
            "tokens_per_s": world * batch * seq / step_s, "peak_gib_per_rank": peaks, "peak_kind": peak_kind,
            "trainable": trainable, "loss": final_loss, "steps": args.steps, "warmup": args.warmup}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--engines", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    parser.add_argument("--batch", type=int, default=None, help="sequences per rank (default: per size)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: per size)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank under MAP")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--fsdp-param-dtype", choices=["keep", "bf16"], default="keep",
                        help="FSDP2 compute dtype of the parameters: keep (bf16 base, fp32 adapters) or bf16 (all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (rank 0)")
    args = parser.parse_args(argv)

    import modapt_lmam.plugin  # noqa: F401  (fail early and clearly if a plugin is missing)
    import modapt_map.plugin  # noqa: F401

    rank, world, device = setup_process_group()
    results = []
    for engine in args.engines.split(","):
        row = run_engine(engine, args, rank, world, device)
        results.append(row)
        if rank == 0:
            peaks = ", ".join(f"{p:.2f}" for p in row["peak_gib_per_rank"])
            print(f"{engine:>4}  world {world}  B {row['batch_per_rank']}x{world}  T {row['seq']}  "
                  f"step {row['step_ms']:.1f} ms  {row['tokens_per_s']:.0f} tokens/s  "
                  f"peak GiB per rank [{peaks}] ({row['peak_kind']})  loss {row['loss']:.4f}", flush=True)
    if rank == 0 and args.out is not None:
        env = {"torch": torch.__version__, "python": platform.python_version(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "backend": dist.get_backend(), "size": args.size, "dtype": args.dtype, "lora_rank": args.rank,
               "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
               "fsdp_param_dtype": args.fsdp_param_dtype}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
