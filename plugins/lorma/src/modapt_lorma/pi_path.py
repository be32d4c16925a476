"""Choosing how ``inflation = "pi"`` applies T = s·Iπ(BA): ``direct``, ``fft`` or ``weight``.

A cost model in multiply-adds (MACs) per layer and call, including backward when the call
records a graph. N tokens, W0 [out, in], rank r, d the size of T (out for pre, in for post),
``g = 1`` when training (a graph is recorded) else 0. The frozen base GEMM costs
N·out·in forward and N·out·in backward (∂x only)::

    direct  = (1+g)·N·out·in·(1 + post) + (1+2g)·N·d² + (1+2g)·r·d²
    weight  = (1+2g)·N·out·in + (1 + g + g·recompute)·out·in·d + (1+2g)·r·d²
    fft     = (1+g)·N·out·in·(1 + post) + (1+2g)·(K/3)·N·r·d·log2(d)

- direct applies T to W0 x (pre) or to x, then W0 again (post: one more base-sized GEMM);
  backward has ∂y and ∂T, two more N·d² GEMMs; building BA is r·d² (and 2·r·d² for ∂A, ∂B).
- weight replaces the base GEMM by x W*ᵀ with W* = T·W0 (out·in·d, independent of N);
  backward: ∂x and ∂W* (2·N·out·in), ∂T = ∂W*·W0ᵀ (out·in·d), + out·in·d if W* is rebuilt.
- fft: r circular correlations per token. Its unit N·r·d·log2(d) is priced at K = 64 MACs
  for forward + backward, from two measurements: the CPU rows below (fft ms per unit over
  direct ms per MAC: K ≈ 43 for the 256-token rows' medians, ≈ 60 from the earlier
  least-squares fit) and the H100 run of the 135M shape (docs/performance.md: fft +92 ms and
  direct +27 ms over PEFT LoRA for 50 G units and 1.07 T MACs: K ≈ 72). FFTs and the
  [N, r, d] products are memory-bound, so one unit costs tens of GEMM multiply-adds on both.

``choose`` takes the cheapest of the allowed paths, ties in the fixed order direct, weight,
fft, so the choice is a pure function of the shapes, the token count and whether a graph is
recorded: deterministic, and the same on every device: the choices that matter are decided
by FLOP counts differing by integer factors, not by fitted constants.
"""

from __future__ import annotations

import math

FFT_MACS_PER_UNIT = 64.0
"""K: MACs one N·r·d·log2(d) unit of the fft path costs, forward + backward (see above)."""

PATHS = ("direct", "weight", "fft")

# The record behind K: (d, r, tokens, direct_ms, fft_ms) for T·y forward + backward, fp32, from
# benchmarks/bench_lorma.py on the 2-core dev machine (one thread, load ≈ 12), 2026-11-23
MEASURED_CPU: list[tuple[int, int, int, float, float]] = [
    (512, 8, 32, 3.518, 2.035),
    (512, 8, 256, 10.959, 44.308),
    (1024, 8, 32, 28.743, 2.678),
    (1024, 8, 256, 46.122, 61.263),
    (2048, 8, 32, 101.261, 14.578),
    (2048, 8, 256, 347.741, 148.158),
    (4096, 8, 32, 1284.832, 23.616),
    (4096, 8, 256, 1739.329, 779.82),
]


def costs(out_f: int, in_f: int, side: str, r: int, tokens: int, *, training: bool,
          recompute: bool = False) -> dict[str, float]:
    """Predicted MACs of each path for one call (forward, + backward when ``training``)."""
    g = 1 if training else 0
    post = side == "post"
    d = in_f if post else out_f
    n = max(tokens, 1)
    base = n * out_f * in_f
    build = (1 + 2 * g) * r * d * d
    return {
        "direct": (1 + g) * base * (1 + post) + (1 + 2 * g) * n * d * d + build,
        "weight": (1 + 2 * g) * base + (1 + g + g * recompute) * out_f * in_f * d + build,
        "fft": (1 + g) * base * (1 + post) + (1 + 2 * g) * FFT_MACS_PER_UNIT / 3 * n * r * d * math.log2(max(d, 2)),
    }


def choose(out_f: int, in_f: int, side: str, r: int, tokens: int, *, training: bool,
           allowed: tuple[str, ...] = PATHS, recompute: bool = False) -> str:
    """The cheapest path among ``allowed`` by :func:`costs` (ties: direct, weight, fft)."""
    predicted = costs(out_f, in_f, side, r, tokens, training=training, recompute=recompute)
    return min((p for p in PATHS if p in allowed), key=lambda p: (predicted[p], PATHS.index(p)))


def weight_threshold(out_f: int, in_f: int, side: str, r: int, *, training: bool = True,
                     recompute: bool = False, limit: int = 1 << 24) -> int | None:
    """The smallest token count from which ``choose`` picks ``weight`` over ``direct`` (None: never)."""
    n = 1
    while n <= limit:
        if choose(out_f, in_f, side, r, n, training=training, allowed=("direct", "weight"),
                  recompute=recompute) == "weight":
            lo, hi = n // 2 + 1, n
            while lo < hi:  # the weight-minus-direct difference falls with N: bisect the first token count
                mid = (lo + hi) // 2
                if choose(out_f, in_f, side, r, mid, training=training, allowed=("direct", "weight"),
                          recompute=recompute) == "weight":
                    hi = mid
                else:
                    lo = mid + 1
            return lo
        n *= 2
    return None
