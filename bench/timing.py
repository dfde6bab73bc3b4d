"""Timing and memory measurement: medians after warm-up, rotated inputs, synchronised peaks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(step: Callable[[int], None], device: torch.device, warmup: int, reps: int) -> dict:
    """Time `step(i)` (i cycles through the caller's rotated input sets): median, 20th and 80th
    percentiles in milliseconds. CUDA: one pair of events per call, after warm-up; CPU:
    `perf_counter` around each call."""
    for i in range(warmup):
        step(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(warmup + i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median": statistics.median(times),
        "p20": _quantile(times, 0.2),
        "p80": _quantile(times, 0.8),
        "reps": reps,
    }


def peak_memory(step: Callable[[int], None], device: torch.device) -> int | None:
    """Peak bytes allocated during one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for backward in one forward, parameters excluded (any device)."""
    skip = {t.data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in skip:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())
