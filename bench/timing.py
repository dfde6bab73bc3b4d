"""Timing and memory measurement: medians after warm-up, rotated inputs, synchronised peaks."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _summary(times: list[float], reps: int) -> dict:
    return {
        "median": statistics.median(times),
        "p20": _quantile(times, 0.2),
        "p80": _quantile(times, 0.8),
        "reps": reps,
    }


def measure(step: Callable[[int], None], device: torch.device, warmup: int, reps: int) -> dict:
    """Time `step(i)` (i cycles through the caller's rotated input sets): median, 20th and 80th
    percentiles in milliseconds.

    CUDA: a pair of events around each call, calls issued back to back with one synchronisation
    at the end, as a training loop runs. The host may queue work ahead of the GPU, so a step
    whose launches outlast its GPU work measures its launch time: that is the cost a user pays.
    CPU: `perf_counter` around each call."""
    for i in range(warmup):
        step(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            start.record()
            step(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, reps)


def measure_graph(step: Callable[[int], None], device: torch.device, warmup: int, reps: int, calls: int) -> dict | None:
    """Device time of `step(i)` without launch overhead: `calls` calls (one per rotated input
    set) captured in one CUDA graph and replayed; each replay's time over `calls`. None on a
    CPU or where the step cannot be captured (a host synchronisation inside, say)."""
    if device.type != "cuda":
        return None
    for i in range(warmup):  # compiles and autotunes outside the capture
        step(i)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                step(i)
    except RuntimeError:
        torch.cuda.synchronize(device)
        return None
    graph.replay()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    return _summary([start.elapsed_time(end) / calls for start, end in events], reps)


def _custom_op_body(func):
    """The Python body of a `torch.library.custom_op` (None if torch no longer exposes it)."""
    try:
        from torch._library.custom_ops import OPDEFS

        return OPDEFS[func._schema.name]._init_fn
    except (ImportError, KeyError, AttributeError):
        return None


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created while it is active and still alive, and their peak: every
    op's new storages are counted when made and released when their storage is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = _custom_op_body(func) if func.namespace == "fura_kernels" else None
        if impl is not None:  # run our own op's body under this mode, so its temporaries count too
            with self:
                out = impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view allocates nothing
            return out
        inputs = {
            t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes and key not in inputs:  # in-place and out= ops reuse an input
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_memory(step: Callable[[int], None], device: torch.device) -> int | None:
    """Peak bytes allocated during one call above what was allocated before it: the CUDA
    allocator's peak on a GPU; on a CPU, the peak of the tensors the step creates, tracked op by
    op (`_LiveBytes`), the same quantity without an allocator to ask."""
    if device.type != "cuda":
        counter = _LiveBytes()
        with counter:
            step(0)
        return counter.peak
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for backward in one forward, the tensors in `exclude` (the module's
    own parameters and buffers) left out (any device)."""
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
