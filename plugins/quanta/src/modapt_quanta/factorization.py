"""How a layer dimension is split into axes d1 × … × dN (the automatic default of ``dims``)."""

from __future__ import annotations

import math


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` with multiplicity, largest first (``12 -> [3, 2, 2]``)."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return sorted(out, reverse=True)


def factorize(d: int, num_axes: int) -> list[int]:
    """Split ``d`` into ``num_axes`` factors as equal as possible, largest first.

    Rule: take the prime factors of ``d`` from the largest down and multiply each into the
    axis whose product is currently smallest (ties: the first). 4096 with 4 axes gives
    [8, 8, 8, 8]; 5120 gives [10, 8, 8, 8]; 11008 (LLaMA-7B's FFN) gives [43, 8, 8, 4].
    Equal axes keep the gates smallest: the parameter count is Σ_{pairs} (d_m d_n)².

    Raises ``ValueError`` when ``d`` has fewer than ``num_axes`` prime factors (an axis of size
    1 would carry no information), naming the options that would work.
    """
    if num_axes < 2:
        raise ValueError(f"num_axes = {num_axes}: QuanTA needs at least 2 axes")
    primes = prime_factors(d)
    if len(primes) < num_axes:
        raise ValueError(f"cannot factor {d} (= {' × '.join(map(str, primes)) or '1'}) into {num_axes} factors "
                         f"greater than 1; set num_axes to at most {max(len(primes), 1)} or give 'dims' explicitly")
    axes = [1] * num_axes
    for p in primes:
        axes[axes.index(min(axes))] *= p
    axes.sort(reverse=True)
    assert math.prod(axes) == d
    return axes
