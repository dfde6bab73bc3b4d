"""Where a layer step's time goes: GPU kernels against host (Python and launch) time.

python -m bench.profile_step --case llama3-8b.q_proj --tokens 8192 --method fura lora_r32

For each method: the step timed as `fura-bench` times it, the sum of its GPU kernel times
from `torch.profiler` (the step's GPU floor on this device), the top kernels, and, with
`--host`, the Python functions that cost the most host time (cProfile) over a few steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

from .methods import METHODS, build, make_step
from .suites import LLAMA3_8B, QWEN3_1_7B
from .timing import measure

CASES = {case.name: case for case in LLAMA3_8B + QWEN3_1_7B}


def _gpu_ms_per_step(step, steps: int) -> tuple[float, str]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60)
    return total_us / 1e3 / steps, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="llama3-8b.q_proj", choices=sorted(CASES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--method", nargs="+", default=["fura", "lora_r32"], choices=METHODS)
    parser.add_argument("--host", action="store_true", help="also print the top host-time functions (cProfile)")
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    case = CASES[args.case]
    inputs = [(torch.randn(args.tokens, case.in_features, device=device, dtype=dtype).requires_grad_(),
               torch.randn(args.tokens, case.out_features, device=device, dtype=dtype)) for _ in range(3)]  # fmt: skip
    summary = []
    for method in args.method:
        step = make_step(build(method, case, dtype, device), inputs)
        timed = measure(step, device, warmup=3, reps=20)["median"]
        gpu_ms, table = _gpu_ms_per_step(step, steps=5)
        print(f"=== {case.name} T={args.tokens} {method}: step {timed:.3f} ms, GPU kernels {gpu_ms:.3f} ms")
        print(table)
        if args.host:
            profiler = cProfile.Profile()
            profiler.enable()
            for i in range(20):
                step(i)
            torch.cuda.synchronize()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
            print(text.getvalue()[-4000:])
        summary.append(f"{method:12s} step {timed:8.3f} ms   GPU kernels {gpu_ms:8.3f} ms")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
