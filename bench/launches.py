"""Count the device operations one training step dispatches, and time its host cost.

`count_step_launches` runs one step (forward, backward, optimiser step) under a dispatch mode
that records every operator that would launch work on a device: views, reshapes and
allocations are left out, and a custom op counts as one launch, as it does on a GPU. On the CPU
path this counts what a GPU step would launch, without a GPU.

`python -m bench.launches` times eager steps of one layer on the CPU path for FuRA and PEFT
LoRA r=32 in the fair configuration (bf16 base weights, fp32 trainables, bf16 autocast,
`AdamW(fused=True)`, FURA_SPEC.md §8), at a size where the step is host-bound, and writes the
host time per step and the launch counts to a results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make a new view of existing memory or allocate it: no kernel runs for them.
_NO_LAUNCH = {
    "aten::_unsafe_view",
    "aten::_reshape_alias",
    "aten::empty",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::lift_fresh",
    "aten::promote_types",  # a dtype computation on the host
    "aten::result_type",
}


class LaunchCounter(TorchDispatchMode):
    """Records the name of every dispatched op that launches device work."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not func.is_view and name not in _NO_LAUNCH and not name.startswith("profiler::"):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def fair_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One training step as HF Trainer runs it with bf16=True: bf16 autocast, then the step."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = module(x)
    y.backward(dy)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_step_launches(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[str]:
    """The device ops of one fair training step (after a warm-up step, so that the optimiser's
    state exists as it does in steady state)."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=True)
    fair_step(module, x, dy, optimizer)
    counter = LaunchCounter()
    with counter:
        fair_step(module, x, dy, optimizer)
    return counter.ops


def build_methods(in_features: int, out_features: int, seed: int = 0) -> dict[str, Callable[[], nn.Module]]:
    """FuRA and PEFT LoRA r=32 on the same bf16 base layer (fp32 trainables, as users run them)."""
    from peft import LoraConfig, get_peft_model

    from fura_kernels import FusedBTTLinear

    def base() -> nn.Linear:
        torch.manual_seed(seed)
        return nn.Linear(in_features, out_features).to(torch.bfloat16)

    def fura() -> nn.Module:
        return FusedBTTLinear.from_linear(base())

    def lora() -> nn.Module:
        holder = nn.Sequential()
        holder.add_module("proj", base())
        model = get_peft_model(holder, LoraConfig(r=32, lora_alpha=64, target_modules=["proj"]))
        return model

    return {"fura": fura, "lora_r32": lora}


def host_time_per_step(module: nn.Module, x, dy, steps: int, warmup: int) -> dict[str, float]:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=True)
    for _ in range(warmup):
        fair_step(module, x, dy, optimizer)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fair_step(module, x, dy, optimizer)
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "median_us": 1e6 * statistics.median(times),
        "p20_us": 1e6 * times[len(times) // 5],
        "p80_us": 1e6 * times[(4 * len(times)) // 5],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__.split("\n\n")[0])
    p.add_argument("--in-features", type=int, default=256)
    p.add_argument("--out-features", type=int, default=256)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    from . import environment

    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.in_features, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(args.tokens, args.out_features, dtype=torch.bfloat16)
    methods = {}
    for name, build in build_methods(args.in_features, args.out_features).items():
        launches = count_step_launches(build(), x, dy)
        timing = host_time_per_step(build(), x, dy, args.steps, args.warmup)
        methods[name] = {"launches_per_step": len(launches), "ops": launches, **timing}
        print(f"{name:9s} {len(launches):3d} launches/step   host {timing['median_us']:8.1f} us/step "
              f"(p20 {timing['p20_us']:.1f}, p80 {timing['p80_us']:.1f})")  # fmt: skip
    ratio = methods["fura"]["median_us"] / methods["lora_r32"]["median_us"]
    result = {
        "environment": environment.describe(torch.device("cpu")),
        "configuration": "fair: bf16 base weights, fp32 trainables, bf16 autocast, AdamW(fused=True); eager",
        "shape": {"in_features": args.in_features, "out_features": args.out_features, "tokens": args.tokens},
        "steps": args.steps,
        "methods": methods,
        "host_time_ratio_fura_over_lora": ratio,
        "launch_target_met": methods["fura"]["launches_per_step"] <= methods["lora_r32"]["launches_per_step"],
        "host_time_target_met": ratio <= 1.0,
    }
    print(f"FuRA / LoRA r=32 host time per step: {ratio:.2f} (target <= 1.0: {'met' if ratio <= 1 else 'missed'})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
