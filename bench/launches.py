"""Count the device launches one training step makes.

`count_step_launches` runs one step (forward, backward, optimiser step) under a dispatch mode,
`LaunchCounter`, that records every operator that launches work on a device (views, reshapes and
allocations are left out) and, inside fura-kernels' custom ops, every Triton kernel they launch
and every PyTorch op they run. On a GPU, and on the CPU in launch-only mode
(`FURA_LAUNCH_ONLY=1`), the list is what the device receives, one entry a launch
(`tests/launch_only` checks it against the launches the driver gets). On the plain CPU path a
custom op runs PyTorch's reference code and counts as one launch, as its kernel does on a GPU.

`python -m bench.launches` prints the launches of one fair step (bf16 base weights, fp32
trainables, bf16 autocast, `AdamW(fused=True)`, FURA_SPEC.md §8) of FuRA and PEFT LoRA r=32 and
writes them to a results file. The host time of a step is `python -m bench host`'s to measure
(in launch-only mode, through Triton's real launch path).
"""

from __future__ import annotations

import argparse
import json
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
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::lift_fresh",
    "aten::promote_types",  # a dtype computation on the host
    "aten::result_type",
}


class LaunchCounter(TorchDispatchMode):
    """Records, in order, every dispatched op that launches device work, and for fura-kernels'
    custom ops the kernels they launch.

    Where a custom op takes the Triton path (a GPU, or launch-only mode), what it launches is
    recorded in its place: each Triton kernel by its name (as Triton's launch hook reports it) and
    each PyTorch op it runs inside (the GEMM after an NF4 dequantisation, a cast), so the list is
    what the device receives, one entry a launch. On the CPU path, where the op runs PyTorch's
    reference code, it counts as one launch under its own name (`fura_kernels::...`), as its
    Triton kernel does on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._inside: list[str] | None = None  # the launches of the custom op now running
        self._triton_launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("fura_kernels::"):
            if self._inside is None:
                return self._custom_op(func, name, args, kwargs)
            return func(*args, **kwargs)  # one custom op inside another: its kernels are reported by Triton's hook
        if not func.is_view and name not in _NO_LAUNCH and not name.startswith("profiler::"):
            (self.ops if self._inside is None else self._inside).append(name)
        return func(*args, **kwargs)

    def _custom_op(self, func, name, args, kwargs):
        """Run the op's own kernel (below the Python dispatch key) with this mode pushed again,
        so the PyTorch ops it runs are seen too, and Triton's launch hook on."""
        self._inside, launched_before = [], self._triton_launches
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        after_python = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
        below_python = torch._C._dispatch_keys(tensor) & after_python
        try:
            with self, _triton_launch_hook(self._on_triton_launch):
                out = func.redispatch(below_python, *args, **kwargs)
        finally:
            inside, self._inside = self._inside, None
        self.ops.extend(inside if self._triton_launches > launched_before else [name])
        return out

    def _on_triton_launch(self, metadata) -> None:
        self._triton_launches += 1
        if self._inside is not None:
            self._inside.append(metadata.data["name"])


class _triton_launch_hook:  # noqa: N801 - a context manager
    """`hook(metadata)` called at every Triton launch while inside (Triton 3.6's single hook or
    3.7+'s chain of hooks); a no-op where Triton is not installed."""

    def __init__(self, hook) -> None:
        self.hook = hook

    def __enter__(self):
        try:
            from triton import knobs
        except ImportError:
            self.runtime = None
            return self
        self.runtime = knobs.runtime
        chain = self.runtime.launch_enter_hook
        if hasattr(chain, "add"):
            chain.add(self.hook)
        else:
            self.saved, self.runtime.launch_enter_hook = chain, self.hook
        return self

    def __exit__(self, *exc) -> None:
        if self.runtime is None:
            return
        chain = self.runtime.launch_enter_hook
        if hasattr(chain, "remove"):
            chain.remove(self.hook)
        else:
            self.runtime.launch_enter_hook = self.saved


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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__.split("\n\n")[0])
    p.add_argument("--in-features", type=int, default=256)
    p.add_argument("--out-features", type=int, default=256)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    from . import environment

    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.in_features, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(args.tokens, args.out_features, dtype=torch.bfloat16)
    methods = {}
    for name, build in build_methods(args.in_features, args.out_features).items():
        launches = count_step_launches(build(), x, dy)
        methods[name] = {"launches_per_step": len(launches), "ops": launches}
        print(f"{name:9s} {len(launches):3d} launches/step: {' '.join(launches)}")
    result = {
        "environment": environment.describe(x.device),
        "configuration": "fair: bf16 base weights, fp32 trainables, bf16 autocast, AdamW(fused=True); eager",
        "shape": {"in_features": args.in_features, "out_features": args.out_features, "tokens": args.tokens},
        "methods": methods,
        "launch_target_met": methods["fura"]["launches_per_step"] <= methods["lora_r32"]["launches_per_step"],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
