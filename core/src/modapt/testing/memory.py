"""Memory of one call, on CUDA or on the CPU: for the benchmark scripts and memory tests.

:func:`peak_bytes` is what the allocator saw; :func:`saved_bytes` is what autograd keeps for the
backward (exact and device-independent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    Each storage counts once (views of one tensor, or one tensor saved by several nodes, are not
    added twice); the storages of ``exclude`` (parameters, buffers, an input: resident anyway)
    are not counted. ``fn`` should run the forward only: storages freed by a backward inside it
    could come back at the same address as other tensors and be counted under their size.
    """
    resident = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
