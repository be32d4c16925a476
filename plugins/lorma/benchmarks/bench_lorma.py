"""Step time and peak memory of LoRA, LoRMA+ and LoRMAπ (direct and FFT) on one d×d layer,
and the π-path table the selector (modapt_lorma.pi_path) is fitted to.

Runs unchanged on CPU and CUDA::

    python plugins/lorma/benchmarks/bench_lorma.py                       # CPU: fp32, 256 tokens
    python plugins/lorma/benchmarks/bench_lorma.py --device cuda         # GPU: bf16 base, 4096 tokens

Part 1: forward + backward of ``y = layer(x)`` (x [tokens, d] requires grad, as inside a
network; the base weight is frozen), each configuration in a fresh child process so that its
peak memory is its own: CUDA ``max_memory_allocated`` above what was allocated before the
step; CPU the process's resident high-water mark above its size before the step.
Part 2: the π transform alone, ``T y`` forward + backward for y [n, d], direct vs fft, at
two token counts: the rows of ``pi_path.MEASURED[device]`` (printed ready to paste), then
the fitted cost model and the crossover d the selector uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

METHODS = {
    "lora": {"method": "lora"},
    "lorma+": {"method": "lorma", "inflation": "plus"},
    "lorma-pi-direct": {"method": "lorma", "inflation": "pi", "pi_path": "direct"},
    "lorma-pi-fft": {"method": "lorma", "inflation": "pi", "pi_path": "fft"},
}


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


def one(method: str, d: int, tokens: int, r: int, device: torch.device, dtype: torch.dtype, repeats: int,
        autocast: bool = False) -> dict:
    """Time and peak memory of one configuration (run in a child process)."""
    import modapt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, d)).to(device=device, dtype=dtype)
    entry = {**METHODS[method], "targets": ["0"], "r": r, "lora_alpha": float(r)}
    modapt.apply(net, {"adapter": [entry]}, registry=registry())
    with torch.no_grad():  # leave the identity init so every path does real work
        for p in modapt.trainable_parameters(net).values():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)

    def step():
        with autocast_ctx(device, autocast):
            out = net(x)
        out.float().pow(2).mean().backward()
        for p in list(modapt.trainable_parameters(net).values()) + [x]:
            p.grad = None

    # CPU: measure from before the warm-up, since the allocator keeps freed blocks resident;
    # CUDA: after it (the caching allocator's peak is reset, cuBLAS workspaces are not counted)
    before = rss_bytes() if device.type == "cpu" else 0
    step()  # warm-up (allocator, kernels, FFT plans)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"step_ms": min(times), "median_ms": statistics.median(times), "peak_mib": max(peak, 0) / 2**20}


def autocast_ctx(device, autocast: bool):
    """bf16 autocast (what a Trainer with bf16=True does) or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()


def pi_rows(dims, token_counts, r, device, dtype, repeats, autocast=False):
    """(d, r, tokens, direct_ms, fft_ms) for T·y forward + backward, the selector's table."""
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

                step()
                times = []
                for _ in range(repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                ms.append(round(min(times), 3))
            rows.append((d, r, n, ms[0], ms[1]))
            print(f"  pi d={d:5d} r={r} tokens={n:5d}: direct {ms[0]:9.2f} ms  fft {ms[1]:9.2f} ms", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 256 CPU, 4096 CUDA)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--skip-layer", action="store_true", help="only the selector table (part 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default 1: stable figures on a shared machine)")
    parser.add_argument("--autocast", action="store_true", help="run the steps under bf16 autocast")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokens = args.tokens or (4096 if device.type == "cuda" else 256)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)

    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), tokens, args.r, device, dtype, repeats, args.autocast)))
        return

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# LoRMA benchmark: {name}, torch {torch.__version__}, {dtype}, r={args.r}, tokens={tokens}, "
          f"best of {repeats}{', bf16 autocast' if args.autocast else ''}")
    if not args.skip_layer:
        print("\n## forward+backward of one d×d layer (x requires grad, base frozen)")
        print(f"{'d':>6} {'method':<16} {'step ms':>9} {'peak MiB':>9}")
        for d in args.dims:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--one", method, str(d), "--device", args.device,
                       "--dtype", str(dtype).removeprefix("torch."), "--tokens", str(tokens), "--r", str(args.r),
                       "--repeats", str(repeats),
                       "--threads", str(torch.get_num_threads())] + (["--autocast"] if args.autocast else [])
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(f"{d:>6} {method:<16} failed: {res.stderr.strip().splitlines()[-1:]}")
                    continue
                out = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{d:>6} {method:<16} {out['step_ms']:9.2f} {out['peak_mib']:9.1f}", flush=True)

    print(f"\n## selector table: T·y forward+backward, {dtype} input (fft computes in fp32)")
    counts = sorted({max(tokens // 8, 1), tokens})
    rows = pi_rows(args.dims, counts, args.r, device, dtype, repeats, args.autocast)
    print(f'\nMEASURED["{device.type}"] = [')
    for row in rows:
        print(f"    {row},")
    print("]")

    from modapt_lorma import pi_path

    pi_path.MEASURED[device.type] = rows
    pi_path.coefficients.cache_clear()
    alpha, beta, gamma = pi_path.coefficients(device.type)
    print(f"fitted: direct ≈ {alpha:.3e}·N·d² + {beta:.3e}·r·d² ms;  fft ≈ {gamma:.3e}·N·r·d·log2(d) ms")
    for n in sorted({1, 64, tokens}):
        for rr in (args.r, 4 * args.r):
            cross = pi_path.crossover(rr, n, device.type)
            print(f"crossover (auto picks fft from d = ...): r={rr:3d} tokens={n:5d}: "
                  f"{cross if cross else 'never up to 65536'}")


if __name__ == "__main__":
    main()
