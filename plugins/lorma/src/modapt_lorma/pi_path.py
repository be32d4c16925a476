"""Choosing how ``inflation = "pi"`` applies Iπ(BA): ``direct`` or ``fft``, from measured figures.

Cost model per forward+backward (N vectors of size d, rank r), fitted per device type to the
table below (rows from ``benchmarks/bench_lorma.py``)::

    direct ≈ α · N·d²  +  β · r·d²          (one GEMM, plus building Iπ(BA))
    fft    ≈ γ · N·r·d·log2(d)              (r correlations per vector)

``choose`` picks the smaller. A device type with no measured rows uses ``direct`` (the
paper's path, and the one that never upcasts bf16). The table holds step times in
milliseconds: (d, r, tokens, direct_ms, fft_ms).
"""

from __future__ import annotations

import functools
import math

# Measured with benchmarks/bench_lorma.py (T·y forward + backward, fp32): CPU = the 2-core dev
# machine, one thread, shared with other jobs (load ≈ 12), so the figures are noisy; 2026-11-23.
MEASURED: dict[str, list[tuple[int, int, int, float, float]]] = {
    "cpu": [
        (512, 8, 32, 3.518, 2.035),
        (512, 8, 256, 10.959, 44.308),
        (1024, 8, 32, 28.743, 2.678),
        (1024, 8, 256, 46.122, 61.263),
        (2048, 8, 32, 101.261, 14.578),
        (2048, 8, 256, 347.741, 148.158),
        (4096, 8, 32, 1284.832, 23.616),
        (4096, 8, 256, 1739.329, 779.82),
    ],
    # GPU slot: the lead fills these rows from `python plugins/lorma/benchmarks/bench_lorma.py --device cuda`
    "cuda": [],
}


@functools.cache
def coefficients(device_type: str) -> tuple[float, float, float] | None:
    """(α, β, γ) of the cost model for ``device_type`` (ms per unit), or ``None`` without measurements."""
    rows = MEASURED.get(device_type) or []
    if not rows:
        return None
    import torch

    # least squares on relative error: each row divided by its measured time
    design, target = [], []
    for d, r, n, direct_ms, _ in rows:
        design.append([n * d * d / direct_ms, r * d * d / direct_ms])
        target.append(1.0)
    sol = torch.linalg.lstsq(torch.tensor(design, dtype=torch.float64),
                             torch.tensor(target, dtype=torch.float64)[:, None]).solution[:, 0]
    alpha, beta = (max(float(v), 0.0) for v in sol)
    gammas = sorted(fft_ms / (n * r * d * math.log2(d)) for d, r, n, _, fft_ms in rows)
    gamma = gammas[len(gammas) // 2]
    return alpha, beta, gamma


def predict(d: int, r: int, tokens: int, device_type: str) -> tuple[float, float] | None:
    """Predicted (direct_ms, fft_ms) for one forward+backward, or ``None`` without measurements."""
    coef = coefficients(device_type)
    if coef is None:
        return None
    alpha, beta, gamma = coef
    return alpha * tokens * d * d + beta * r * d * d, gamma * tokens * r * d * math.log2(max(d, 2))


def choose(d: int, r: int, tokens: int, device_type: str) -> str:
    """``"fft"`` where the measured cost model says it is faster, else ``"direct"``."""
    costs = predict(d, r, tokens, device_type)
    if costs is None:
        return "direct"
    return "fft" if costs[1] < costs[0] else "direct"


def crossover(r: int, tokens: int, device_type: str, d_max: int = 1 << 16) -> int | None:
    """The smallest power-of-two d at which ``choose`` picks ``fft`` (``None``: none up to ``d_max``)."""
    d = 64
    while d <= d_max:
        if choose(d, r, tokens, device_type) == "fft":
            return d
        d *= 2
    return None
