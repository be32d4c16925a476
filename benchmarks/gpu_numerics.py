"""GPU numerics of the paths that run differently on CUDA (CI has no GPU): a few layers, float64 references.

    python benchmarks/gpu_numerics.py          # on the GPU machine; prints one line per check, exits 1 on a failure
    python benchmarks/gpu_numerics.py cpu      # the same checks on the CPU (the fallbacks)

Each check adapts one bf16 ``nn.Linear`` (fp32 adapters, no autocast: the benchmark's 1B setting)
with randomised adapter parameters, runs forward and backward on CUDA, and compares the output
and every gradient with the same layer computed in float64 from the definition (MAP, DoRA) or
LoRMAπ on its weight path (W* from T's two half parts, float32-output ∂T), near and far from T = I.
The bound is bf16's: relative error below 2e-2 (the CPU tests use the same).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import modapt
from modapt import float32_gemm

N, IN, OUT, R = 512, 384, 256, 8
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def randomised(recipe: dict, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, OUT, bias=False)).to(DEVICE, torch.bfloat16)
    modapt.apply(net, recipe)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(modapt.trainable_parameters(net).items()):
            p.copy_(torch.randn(p.shape, generator=gen, device=DEVICE) * (0.3 if p.dim() else 1.0) + (p if p.dim() == 0 else 0))
    return net


def run(net, x, g):
    x = x.clone().requires_grad_()
    y = net(x)
    y.backward(g)
    grads = {"x": x.grad.double(), **{k: p.grad.double() for k, p in sorted(modapt.trainable_parameters(net).items())}}
    return y.detach().double(), grads


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def map_reference(net, x, g):
    host = net[0]
    leaves = {k: p.detach().double().requires_grad_() for k, p in sorted(modapt.trainable_parameters(net).items())}
    xx = x.double().requires_grad_()
    w0 = host.base_layer.weight.double()
    s = host.update.scaling
    delta = s * leaves["0.lora_B.weight"] @ leaves["0.lora_A.weight"]
    w = leaves["0.map_alpha"] * w0 / w0.norm() + leaves["0.map_beta"] * delta / delta.norm()
    y = xx @ w.t()
    grads = torch.autograd.grad(y, [xx, *leaves.values()], g.double())
    return y.detach(), dict(zip(["x", *leaves], grads))


def dora_reference(net, x, g):
    host = net[0]
    leaves = {k: p.detach().double().requires_grad_() for k, p in sorted(modapt.trainable_parameters(net).items())}
    xx = x.double().requires_grad_()
    w0 = host.base_layer.weight.double()
    weight = w0 + host.update.scaling * leaves["0.lora_B.weight"] @ leaves["0.lora_A.weight"]
    norm = weight.norm(dim=1).detach()  # DoRA §4.3: the norm is a constant of the step
    y = xx @ ((leaves["0.lora_magnitude_vector"] / norm).unsqueeze(1) * weight).t()
    grads = torch.autograd.grad(y, [xx, *leaves.values()], g.double())
    return y.detach(), dict(zip(["x", *leaves], grads))


def lorma_pi(shrink):
    """LoRMAπ on the weight path: at its identity init plus N(0, 0.01²) noise (``shrink`` 0.0), or
    with every parameter randomised (``None``: T far from I)."""
    recipe = {"adapter": [{"method": "lorma", "targets": ["0"], "r": R, "inflation": "pi", "pi_path": "weight"}]}
    if shrink is None:
        return randomised(recipe)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, OUT, bias=False)).to(DEVICE, torch.bfloat16)
    modapt.apply(net, recipe)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    with torch.no_grad():
        for p in (net[0].lorma_A, net[0].lorma_B):
            p.add_(torch.randn(p.shape, generator=gen, device=DEVICE) * 0.01)
    return net


def lorma_reference(net, x, g):
    """y = x (T·W0)ᵀ, T = s·Iπ(B A), in float64 with an explicit rotation index (the pre side)."""
    host = net[0]
    a = host.lorma_A.detach().double().requires_grad_()
    b = host.lorma_B.detach().double().requires_grad_()
    xx = x.double().requires_grad_()
    d = a.shape[1]
    rows = torch.arange(d, device=a.device)
    index = (rows[None, :] - rows[:, None]) % d  # Iπ(M)[i, j] = M[i, (j − i) mod d]
    t = host.update.scaling * (b @ a).gather(1, index)
    y = xx @ (t @ host.base_layer.weight.double()).t()
    grads = torch.autograd.grad(y, [xx, a, b], g.double())
    return y.detach(), dict(zip(["x", "0.lorma_A", "0.lorma_B"], grads))


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(N, IN, generator=gen, device=DEVICE).to(torch.bfloat16)
    g = torch.randn(N, OUT, generator=gen, device=DEVICE).to(torch.bfloat16)
    lora = {"method": "lora", "r": R, "lora_alpha": 2.0 * R}
    failures = 0
    checks = {
        "lomap": (randomised({"adapter": [{"method": "map", "targets": ["0"], "update": lora}]}), map_reference),
        "dora": (randomised({"adapter": [{"method": "dora", "targets": ["0"], "update": lora}]}), dora_reference),
    }
    for name, (net, reference) in checks.items():
        y, grads = run(net, x, g)
        y_ref, want = reference(net, x, g)
        errs = {"y": rel(y, y_ref), **{k: rel(grads[k], want[k]) for k in want}}
        ok = all(e < 2e-2 for e in errs.values())
        failures += not ok
        print(f"{name}: {'ok' if ok else 'FAIL'} " + " ".join(f"{k}={e:.2e}" for k, e in errs.items()), flush=True)
    for label, shrink in (("T near I", 0.0), ("T far from I", None)):
        net = lorma_pi(shrink)
        y, grads = run(net, x, g)
        y_ref, want = lorma_reference(net, x, g)
        errs = {"y": rel(y, y_ref), **{k: rel(grads[k], want[k]) for k in want}}
        ok = all(e < 2e-2 for e in errs.values())
        failures += not ok
        print(f"lorma-pi weight path, {label}: {'ok' if ok else 'FAIL'} " + " ".join(f"{k}={e:.2e}" for k, e in errs.items()),
              flush=True)
    print(f"float32-output GEMM on {DEVICE}: {float32_gemm.available(DEVICE)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
