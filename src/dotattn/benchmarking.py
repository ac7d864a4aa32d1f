"""Timing and memory helpers shared by ``dotattn bench`` and the scripts in ``benchmarks/``.

What each measures, and how:

  timed       seconds per call of several functions, side by side: one warm-up call
              each, then ``repeats`` rounds that run every function once in turn
              (interleaved run by run, so machine drift hits all alike); the median of
              each function's runs.
  gemm_peak   GFLOP/s of an n x n torch.matmul in a dtype (2·n³ flops per call): the
              fastest of ``repeats`` runs, not the median, since a peak is what the
              machine can do. A dtype without a fast GEMM on this CPU is probed once at
              n = 384 so the probe stays short.
  peak_bytes  peak bytes torch allocated on the CPU during one call, above what was live
              at its start (inputs not counted), in this process: the torch profiler with
              profile_memory=True, its allocation and free events summed in time order.
              Memory that does not go through torch's allocator (e.g. a kernel's stack
              tiles) is not seen. The profiler's C++ start/stop lines on file descriptor 2
              are silenced while it runs.

Wall-clock times come from time.perf_counter.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

__all__ = ["gemm_peak", "peak_bytes", "timed"]


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square n x n matmul in ``dtype``: the fastest of ``repeats``, since a peak
    is what the machine can do, and a busy neighbour only ever slows a run down.

    A dtype this CPU has no fast GEMM for (bfloat16 without AVX512-BF16 or AMX runs
    below 1 GFLOP/s on some machines) is measured at n = 384 once, so the probe takes
    a second rather than minutes.
    """
    a, b = torch.randn(256, 256).to(dtype), torch.randn(256, 256).to(dtype)
    start = time.perf_counter()
    a @ b
    if 2 * 256**3 / (time.perf_counter() - start) < 5e9:
        n, repeats = 384, 1
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def timed(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function, interleaved run by run (after one warm-up each)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence file descriptor 2 for the block: the profiler's C++ start/stop lines go there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes torch allocated on the CPU while fn() ran, above what was live at its start.

    Walks the torch profiler's allocation events (positive for an allocation, negative
    for a free) in time order and keeps the running maximum of their sum.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak
