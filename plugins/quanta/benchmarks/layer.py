"""One adapted layer, forward + backward: time, saved activations and peak memory, QuanTA vs LoRA r=16.

Rows: modapt LoRA r=16; QuanTA on the fused recomputing path (the plugin's ``forward``); QuanTA
on the former einsum path (T(θ) x with autograd, T(θ0) x under no_grad; kept here as "before").
x [tokens, in] requires grad, as inside a transformer. Times are medians of interleaved runs
(the three layers take turns, so a noisy machine slows all alike).

``saved``: bytes autograd keeps between forward and backward beyond x itself and the
parameters/buffers (what a layer adds to a training step's activation memory).
``peak``: the highest allocation above the start during forward + backward
(CUDA: ``max_memory_allocated``; CPU: the profiler's allocation events). For one layer it is
the backward's transient (QuanTA recomputes its intermediates there); ``--depth 8`` stacks
layers so the peak shows what a model sees: saved activations adding up, one transient on top.

    python plugins/quanta/benchmarks/layer.py                          # CPU: 576 and 2048 wide, 2048 tokens
    python plugins/quanta/benchmarks/layer.py --tokens 8192 --dtype bf16   # on a GPU (the ~1B step's 8 x 1024)
"""

from __future__ import annotations

import argparse
import statistics
import time

import modapt
import modapt.lora
import modapt_quanta.plugin
import torch
from modapt.testing.memory import peak_bytes, saved_bytes
from modapt_quanta.circuit import apply_circuit
from torch import nn


def einsum_forward(update):
    """The former Quanta.forward (before the fused path): two einsum circuits, θ0's without autograd."""

    def forward(x, base_out, base_layer):
        theta, theta0 = update.host.quanta_theta, update.host.quanta_theta0
        if x.dtype != theta.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(theta.dtype)
        x = update.host.quanta_dropout(x)
        with torch.no_grad():
            frozen = apply_circuit(update.circuit, theta0.to(theta.dtype), x)
        return apply_circuit(update.circuit, theta, x) - frozen

    return forward


def layers(out_f, in_f, device, dtype, registry, depth=1):
    """name -> a stack of ``depth`` adapted Linear(in_f, out_f) layers (square when depth > 1)."""
    out = {}
    for name, adapter in [("lora r=16", {"method": "lora", "r": 16, "lora_alpha": 32.0}),
                          ("quanta fused", {"method": "quanta"}), ("quanta einsum (before)", {"method": "quanta"})]:
        torch.manual_seed(0)
        base = nn.Sequential(*[nn.Linear(in_f, out_f, device=device, dtype=dtype) for _ in range(depth)])
        model = modapt.apply(base, {"adapter": [{**adapter, "targets": ["Linear"]}]}, registry=registry)
        if "before" in name:
            for host in model:
                host.update.forward = einsum_forward(host.update)
        out[name] = model
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_for_backward(model, x, autocast) -> int:
    """Bytes of the distinct storages autograd saves for backward, x and parameters/buffers excluded."""

    def forward():
        with autocast():
            model(x)

    return saved_bytes(forward, [x, *model.parameters(), *model.buffers()])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="*", default=[576, 2048], help="square layers in = out")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", choices=["fp32", "bf16", "autocast"], default=None,
                   help="bf16: bf16 base, fp32 adapters (the core's default); autocast: fp32 weights under "
                        "bf16 autocast. Default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--depth", type=int, default=1,
                   help="adapted layers in a stack: the peak then shows the saved activations adding up")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    registry = modapt.Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    registry.register_plugin(modapt_quanta.plugin, name="quanta", distribution="modapt-quanta")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast")

    print(f"device {device}, {mode}, tokens {args.tokens}, depth {args.depth}, medians of {args.repeats} interleaved runs")
    print("| width | layer | fwd+bwd ms | × LoRA | saved MiB (beyond x) | peak MiB | × LoRA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for width in args.widths:
        models = layers(width, width, device, dtype, registry, args.depth)
        torch.manual_seed(1)
        x = torch.randn(args.tokens, width, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(args.tokens, width, device=device, dtype=dtype)

        def step(model):
            with autocast():
                y = model(x)
            y.backward(g)
            x.grad = None
            for q in model.parameters():
                q.grad = None

        for model in models.values():  # warm-up
            step(model)
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                sync(device)
                start = time.perf_counter()
                step(model)
                sync(device)
                times[name].append(time.perf_counter() - start)
        base_t = statistics.median(times["lora r=16"])
        base_peak = None
        for name, model in models.items():
            t = statistics.median(times[name])
            peak = peak_bytes(lambda: step(model), device) / 2**20
            base_peak = base_peak or peak
            saved = saved_for_backward(model, x, autocast) / 2**20
            print(f"| {width} | {name} | {t * 1e3:.2f} | {t / base_t:.2f} | {saved:.1f} | {peak:.1f} | "
                  f"{peak / base_peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
