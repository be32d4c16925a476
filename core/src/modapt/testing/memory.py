"""Peak memory of one call, on CUDA or on the CPU: for the benchmark scripts."""

from __future__ import annotations

import torch


def peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above the allocation at its start.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the running sum of the profiler's
    allocation (+) and free (−) events, in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
