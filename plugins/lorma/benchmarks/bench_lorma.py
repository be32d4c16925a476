"""Step time and memory of LoRA, LoRMA+ and the LoRMAπ paths (direct, fft, weight) on one layer,
and what the selector (modapt_lorma.pi_path) predicts for the ~1B LLaMA shape.

Runs unchanged on CPU and CUDA::

    python plugins/lorma/benchmarks/bench_lorma.py                       # CPU: fp32, 5632×2048, 512 tokens
    python plugins/lorma/benchmarks/bench_lorma.py --device cuda         # GPU: bf16 base, 8192 tokens

Part 1: forward + backward of ``y = layer(x)`` for an ``nn.Linear(in, out)`` (x [tokens, in]
requires grad, as inside a network; the base weight is frozen). Each (shape, method) runs in a
fresh child process, and the methods are interleaved over ``--rounds`` rounds so that a noisy
machine slows them alike; the figure is the median over rounds of each child's median step,
and "x lora" the median over rounds of the ratio to LoRA within the round.
Memory, three ways: *saved* = bytes of the tensors autograd keeps for backward (unique
storages, parameters and buffers excluded; exact and device-independent); *peak* = CUDA
``max_memory_allocated`` above the state before the step, or on CPU the resident high-water
mark above the process size before the warm-up (coarse).
Part 2 (``--model-estimate``): the selector's per-projection choice and the FLOP ratio of
LoRMAπ to LoRA for a LLaMA shape (default: the ~1B one of benchmarks/train_step.py).
Part 3 (``--fft-table``): the T·y forward + backward table behind the fft constant
(``pi_path.MEASURED_CPU``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys

import torch
from modapt.testing.memory import saved_bytes
from modapt.testing.step_timing import time_steps
from torch import nn

METHODS = {
    "lora": {"method": "lora"},
    "lorma+": {"method": "lorma", "inflation": "plus"},
    "lorma-pi-direct": {"method": "lorma", "inflation": "pi", "pi_path": "direct"},
    "lorma-pi-fft": {"method": "lorma", "inflation": "pi", "pi_path": "fft"},
    "lorma-pi-weight": {"method": "lorma", "inflation": "pi", "pi_path": "weight"},
    # the same path with W* rebuilt in backward instead of kept (modapt.fast_paths(lorma_recompute_weight=True))
    "lorma-pi-weight-recompute": {"method": "lorma", "inflation": "pi", "pi_path": "weight"},
    # the same path with T and W* built in the base's dtype (fast_paths(lorma_build_in_base_dtype=True); bf16 on CUDA)
    "lorma-pi-weight-basedtype": {"method": "lorma", "inflation": "pi", "pi_path": "weight"},
    "lorma-pi-auto": {"method": "lorma", "inflation": "pi", "pi_path": "auto"},
}
DEFAULT_METHODS = ["lora", "lorma-pi-direct", "lorma-pi-weight", "lorma-pi-weight-recompute"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def registry():
    import modapt.lora
    import modapt_lorma.plugin
    from modapt.registry import Registry

    reg = Registry(autoload=False)
    reg.register_plugin(modapt.lora, name="lora", distribution="modapt")
    reg.register_plugin(modapt_lorma.plugin, name="lorma", distribution="modapt-lorma")
    return reg


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def autocast_ctx(device, autocast: bool):
    """bf16 autocast (what a Trainer with bf16=True does) or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()


def one(method: str, out_f: int, in_f: int, tokens: int, r: int, device: torch.device, dtype: torch.dtype,
        repeats: int, autocast: bool = False) -> dict:
    """Step time and memory of one configuration (run in a child process)."""
    import modapt

    with modapt.fast_paths(lorma_recompute_weight=method.endswith("-recompute"),
                           lorma_build_in_base_dtype=method.endswith("-basedtype")):
        return _one(method, out_f, in_f, tokens, r, device, dtype, repeats, autocast)


def _one(method: str, out_f: int, in_f: int, tokens: int, r: int, device: torch.device, dtype: torch.dtype,
         repeats: int, autocast: bool = False) -> dict:
    import modapt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(in_f, out_f)).to(device=device, dtype=dtype)
    entry = {**METHODS[method], "targets": ["0"], "r": r, "lora_alpha": float(r)}
    modapt.apply(net, {"adapter": [entry]}, registry=registry())
    with torch.no_grad():  # leave the identity init so every path does real work
        for p in modapt.trainable_parameters(net).values():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    params = [*net.parameters(), *net.buffers()]

    def forward():
        with autocast_ctx(device, autocast):
            return net(x)

    def step():
        forward().float().pow(2).mean().backward()
        for p in list(modapt.trainable_parameters(net).values()) + [x]:
            p.grad = None

    # CPU: measure from before the warm-up, since the allocator keeps freed blocks resident;
    # CUDA: after it (the caching allocator's peak is reset, cuBLAS workspaces are not counted)
    before = rss_bytes() if device.type == "cpu" else 0
    step()  # warm-up (allocator, kernels, FFT plans)
    sync(device)
    saved = saved_bytes(forward, params)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
    seconds, cuda_peak = time_steps(step, device, 0, repeats)  # resets the CUDA peak first
    times = [t * 1e3 for t in seconds]
    if device.type == "cuda":
        peak = cuda_peak - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"median_ms": statistics.median(times), "min_ms": min(times), "saved_mib": saved / 2**20,
            "peak_mib": max(peak, 0) / 2**20}


def layer_table(args, device, dtype, tokens, repeats):
    """Part 1: the methods interleaved over rounds, each (shape, method) in a fresh child process."""
    print(f"\n## forward+backward of one nn.Linear(in, out), {tokens} tokens (x requires grad, base frozen); "
          f"median over {args.rounds} interleaved rounds of each child's median of {repeats}")
    print(f"{'out x in':>11} {'method':<26} {'step ms':>9} {'runs (ms)':<28} {'x lora':>7} {'saved MiB':>10} "
          f"{'peak MiB':>9}")
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for _ in range(args.rounds):
            for method in args.methods:
                cmd = [sys.executable, __file__, "--one", method, str(out_f), str(in_f), "--device", args.device,
                       "--dtype", str(dtype).removeprefix("torch."), "--tokens", str(tokens), "--r", str(args.r),
                       "--repeats", str(repeats),
                       "--threads", str(torch.get_num_threads())] + (["--autocast"] if args.autocast else [])
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(f"{shape:>11} {method:<26} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                runs[method].append(json.loads(res.stdout.strip().splitlines()[-1]))
        lora = runs.get("lora") or []
        for method, rows in runs.items():
            if not rows:
                continue
            ms = statistics.median(r["median_ms"] for r in rows)
            # the ratio within each round (same machine load), then the median over rounds
            ratios = [r["median_ms"] / b["median_ms"] for r, b in zip(rows, lora)]
            ratio = f"{statistics.median(ratios):7.2f}" if len(rows) == len(lora) and lora else "      –"
            each = " ".join(f"{r['median_ms']:.0f}" for r in rows)
            print(f"{shape:>11} {method:<26} {ms:9.1f} {each:<28} {ratio} {rows[0]['saved_mib']:10.1f} "
                  f"{statistics.median(r['peak_mib'] for r in rows):9.1f}", flush=True)


def model_estimate(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, seq: int,
                   batch: int, r: int, side: str) -> None:
    """Part 2: per-projection choice of ``auto`` and the step FLOP ratio LoRMAπ / LoRA (MACs, frozen base)."""
    from modapt_lorma import pi_path

    n = batch * seq
    head = hidden // heads
    shapes = {"q": (hidden, hidden), "k": (kv_heads * head, hidden), "v": (kv_heads * head, hidden),
              "o": (hidden, hidden), "gate": (intermediate, hidden), "up": (intermediate, hidden),
              "down": (hidden, intermediate)}
    # the part every method shares: causal attention (QKᵀ and AV, half the matrix, backward ≈ 2×
    # forward) and the frozen lm_head (forward and ∂x)
    attention = layers * 3 * (2 * n * seq * hidden) / 2
    lm_head = 2 * n * hidden * vocab
    lora = attention + lm_head + layers * sum(2 * n * o * i + 3 * n * r * (o + i) for o, i in shapes.values())
    print(f"\n## FLOP model, LLaMA {hidden}/{intermediate} x {layers} layers, N = {batch}x{seq} = {n} tokens, r = {r}, "
          f"side = {side} (MACs per step, G)")
    print(f"{'proj':<5} {'out x in':>11} {'base+LoRA':>10} {'direct':>10} {'weight':>10} {'weight-rc':>10} "
          f"{'fft':>10}  auto")
    totals = {"direct": 0.0, "weight": 0.0, "weight-rc": 0.0, "fft": 0.0, "auto": 0.0, "auto-rc": 0.0}
    for name, (o, i) in shapes.items():
        c = pi_path.costs(o, i, side, r, n, training=True)
        rc = pi_path.costs(o, i, side, r, n, training=True, recompute=True)["weight"]
        pick = pi_path.choose(o, i, side, r, n, training=True)
        pick_rc = pi_path.choose(o, i, side, r, n, training=True, recompute=True)
        lora_layer = 2 * n * o * i + 3 * n * r * (o + i)
        print(f"{name:<5} {f'{o}x{i}':>11} {lora_layer / 1e9:10.1f} {c['direct'] / 1e9:10.1f} "
              f"{c['weight'] / 1e9:10.1f} {rc / 1e9:10.1f} {c['fft'] / 1e9:10.1f}  {pick}")
        for key, value in (("direct", c["direct"]), ("weight", c["weight"]), ("weight-rc", rc), ("fft", c["fft"]),
                           ("auto", c[pick]), ("auto-rc", rc if pick_rc == "weight" else c[pick_rc])):
            totals[key] += layers * value
    print(f"shared (attention {attention / 1e12:.1f} T, lm_head {lm_head / 1e12:.1f} T); LoRA step {lora / 1e12:.1f} T MACs")
    for key, value in totals.items():
        print(f"LoRMApi {key:<10} step {(value + attention + lm_head) / 1e12:6.1f} T MACs = "
              f"{(value + attention + lm_head) / lora:5.2f} x LoRA")


def fft_table(dims, token_counts, r, device, dtype, repeats, autocast=False):
    """Part 3: (d, r, tokens, direct_ms, fft_ms) for T·y forward + backward (the record behind K)."""
    from modapt_lorma.inflation import pi_apply_direct, pi_apply_fft

    rows = []
    for d in dims:
        gen = torch.Generator().manual_seed(d)
        a = (torch.randn(r, d, generator=gen) * 0.1).to(device).requires_grad_()
        b = (torch.randn(d, r, generator=gen) * 0.1).to(device).requires_grad_()
        for n in token_counts:
            y = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
            ms = []
            for fn in (pi_apply_direct, pi_apply_fft):
                def step(fn=fn, a=a, b=b, y=y):
                    with autocast_ctx(device, autocast):
                        out = fn(a, b, 1.0, y)
                    out.float().pow(2).mean().backward()
                    a.grad = b.grad = None

                seconds, _ = time_steps(step, device, 1, repeats)
                ms.append(round(statistics.median(seconds) * 1e3, 3))
            rows.append((d, r, n, ms[0], ms[1]))
            units = n * r * d * math.log2(d)
            print(f"    ({d}, {r}, {n}, {ms[0]}, {ms[1]}),   # K ≈ {ms[1] / units / (ms[0] / (3 * n * d * d)):.0f}",
                  flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--shapes", nargs="+", default=["5632x2048"], help="layer shapes OUTxIN")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 512 CPU, 8192 CUDA)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="steps per child (default 3 CPU, 20 CUDA)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5 CPU, 3 CUDA)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--skip-layer", action="store_true", help="no part 1")
    parser.add_argument("--model-estimate", action="store_true", help="part 2: FLOP model of the ~1B LLaMA shape")
    parser.add_argument("--side", default="pre", choices=["pre", "post"], help="side for part 2")
    parser.add_argument("--fft-table", action="store_true", help="part 3: the T·y table behind the fft constant")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--autocast", action="store_true", help="run the steps under bf16 autocast")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "OUT", "IN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokens = args.tokens or (8192 if device.type == "cuda" else 512)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    args.rounds = args.rounds or (3 if device.type == "cuda" else 5)

    if args.one:
        method, out_f, in_f = args.one
        print(json.dumps(one(method, int(out_f), int(in_f), tokens, args.r, device, dtype, repeats, args.autocast)))
        return

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# LoRMA benchmark: {name}, torch {torch.__version__}, {dtype}, r={args.r}, tokens={tokens}"
          f"{', bf16 autocast' if args.autocast else ''}")
    if not args.skip_layer:
        layer_table(args, device, dtype, tokens, repeats)
    if args.model_estimate:
        model_estimate(2048, 5632, 22, 32, 4, 32000, 1024, 8, args.r, args.side)
    if args.fft_table:
        print(f"\n## T·y forward+backward, {dtype} input (fft computes in fp32): rows of pi_path.MEASURED_CPU")
        fft_table([512, 1024, 2048, 4096], [32, 256], 8, device, dtype, repeats, args.autocast)


if __name__ == "__main__":
    main()
