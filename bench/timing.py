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


def spread(times: Sequence[float]) -> float:
    """(p80 - p20) / median of repeated timings: how far the middle 60% of them disagree."""
    median = statistics.median(times)
    return (_quantile(times, 0.8) - _quantile(times, 0.2)) / median if median > 0 else float("inf")


# A whole-model comparison is only as good as its spread: repetitions go on until the p20-p80
# spread is under this fraction of the median (or the cap is reached, and the record says so).
SPREAD_TARGET = 0.05


def enough_reps(times: Sequence[float], min_reps: int, max_reps: int, target: float = SPREAD_TARGET) -> bool:
    """The stopping rule of `measure_until_steady`: stop at `max_reps`, or once at least
    `min_reps` timings are in and their spread is under `target`."""
    if len(times) >= max_reps:
        return True
    return len(times) >= min_reps and spread(times) < target


def _timed_calls(step: Callable[[int], None], device: torch.device, first: int, reps: int) -> list[float]:
    """Milliseconds of `step(first)` ... `step(first + reps - 1)`, issued back to back."""
    if device.type != "cuda":
        times = []
        for i in range(first, first + reps):
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        step(first + i)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def measure(step: Callable[[int], None], device: torch.device, warmup: int, reps: int) -> dict:
    """Time `step(i)` (i cycles through the caller's rotated input sets): median, 20th and 80th
    percentiles in milliseconds.

    CUDA: a pair of events around each call, calls issued back to back with one synchronisation
    at the end, as a training loop runs. The host may queue work ahead of the GPU, so a step
    whose launches outlast its GPU work measures its launch time: that is the cost a user pays.
    CPU: `perf_counter` around each call."""
    for i in range(warmup):
        step(i)
    return _summary(_timed_calls(step, device, warmup, reps), reps)


def measure_until_steady(
    step: Callable[[int], None],
    device: torch.device,
    warmup: int,
    min_reps: int,
    max_reps: int,
    target: float = SPREAD_TARGET,
) -> dict:
    """`measure` in rounds of back-to-back calls until `enough_reps` says stop: `min_reps`
    first, then a quarter as many again each round. The summary adds the final `spread` and
    `spread_target_met` (False: the cap came first, and the figure is less certain than
    `target` says)."""
    for i in range(warmup):
        step(i)
    times: list[float] = []
    while not enough_reps(times, min_reps, max_reps, target):
        more = min_reps if not times else max(1, min_reps // 4)
        times += _timed_calls(step, device, warmup + len(times), min(more, max_reps - len(times)))
    final = spread(times)
    return {**_summary(times, len(times)), "spread": final, "spread_target": target,
            "spread_target_met": final < target}  # fmt: skip


def measure_graph(step: Callable[[int], None], device: torch.device, warmup: int, reps: int, calls: int) -> dict | None:
    """Device time of `step(i)` without launch overhead: `calls` calls (one per rotated input
    set) captured in one CUDA graph and replayed; each replay's time over `calls`. None on a
    CPU or where the step cannot be captured (a host synchronisation inside, say)."""
    if device.type != "cuda":
        return None
    replay = graph_replay(step, device, warmup, calls)
    return None if replay is None else measure_replay(replay, device, reps, calls)


def measure_replay(replay: Callable[[int], None], device: torch.device, reps: int, calls: int) -> dict:
    """The time of one step of a graph `replay` holding `calls` steps: each replay's over `calls`."""
    return _summary([t / calls for t in _timed_calls(replay, device, 0, reps)], reps)


def busy_ms(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of `(start, end)` intervals: time during which at least one ran."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def kernel_summary(kernels: Sequence[tuple[str, float, float]], wall_ms: float, calls: int, top: int = 8) -> dict:
    """What the device did during `calls` steps that took `wall_ms` in all: `kernels` holds each
    device activity as (name, start ms, end ms). Per step: the kernels' summed time, the time at
    least one ran, and that over the wall time (the device-busy fraction: 1.0 means the host kept
    the device fed; well below it, launches, synchronisations or gaps cost the rest), with the
    `top` kernels by time."""
    by_name: dict[str, float] = {}
    for name, start, end in kernels:
        by_name[name] = by_name.get(name, 0.0) + end - start
    busy = busy_ms([(start, end) for _, start, end in kernels])
    heaviest = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {"kernel_ms": sum(by_name.values()) / calls, "busy_ms": busy / calls, "wall_ms": wall_ms / calls,
            "device_busy": busy / wall_ms if wall_ms > 0 else None, "launches": len(kernels) / calls,
            "top_kernels": {name[:120]: ms / calls for name, ms in heaviest}}  # fmt: skip


def kernel_profile(
    step: Callable[[int], None], device: torch.device, first: int, calls: int, steps_per_call: int = 1
) -> dict | None:
    """`kernel_summary` of `step(first)` ... `step(first + calls - 1)` issued back to back,
    from `torch.profiler`'s device activities (kernels, copies, fills): the device's own account
    of a step, to set beside the event-timed figure, per step (a graph replay holds
    `steps_per_call` of them). None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(first, first + calls):
            step(i)
        end.record()
        torch.cuda.synchronize(device)
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [(e.name, e.time_range.start / 1e3, e.time_range.end / 1e3) for e in device_events]
    return kernel_summary(kernels, start.elapsed_time(end), calls * steps_per_call)


def graph_replay(step: Callable[[int], None], device: torch.device, warmup: int, calls: int):
    """`step(0)` ... `step(calls - 1)` captured in one CUDA graph, as a function of one index
    that replays it all; None where the step cannot be captured.

    The warm-up runs on the stream the capture then uses, as PyTorch's whole-network capture
    recipe does: whatever a library sets up per stream on first use (cuBLAS(Lt) workspaces
    among it, whose size bounds the algorithms cuBLAS may pick) is set up outside the capture,
    from the ordinary allocator, so the captured GEMMs are the ones eager runs. (Capturing on a
    fresh side stream left that first use inside the capture: one suspect of the H200's graphed
    steps running slower than eager.)"""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(warmup):  # compiles and autotunes outside the capture, on the capture stream
            step(i)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            for i in range(calls):
                step(i)
    except RuntimeError:
        torch.cuda.synchronize(device)
        return None
    graph.replay()
    torch.cuda.synchronize(device)
    return lambda i: graph.replay()


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
