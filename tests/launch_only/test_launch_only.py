"""Launch-only mode runs the production kernels through the production launch path.

- The binaries the launch plans call are the ones the compile tier checks
  (`tests/kernels/test_compile.py`): the same specialisation of the same source, compiled for
  sm_90 with the same options, down to the cubin's bytes.
- A layer step launches exactly what `bench.launches.LaunchCounter` reports, kernel for kernel
  and grid for grid, on the plans' direct path as on the path Triton's own launcher takes.
- A plan's direct call into Triton's C launcher hands the driver the launch Triton's launcher
  hands it.

Run by `tests/test_launch_only_mode.py` in a process started with `FURA_LAUNCH_ONLY=1`.
"""

from __future__ import annotations

import pytest
import torch
import triton

from bench import host
from bench.launches import LaunchCounter
from fura_kernels.triton import launch_only, ops, plans
from fura_kernels.triton.plans import TRITON_DEVICE_TYPE
from tests.kernels import compile_check as cc
from tests.kernels.test_compile import FURA_TOKENS, MIXED_BATCHES, NF4_TOKENS, OUT

HOPPER = cc.GPUTarget("cuda", 90, 32)
AUTOTUNED = ("block_diag_matmul_kernel", "block_diag_backward_kernel")


def test_the_mode_is_on():
    from triton.runtime import driver

    assert launch_only.ENABLED and TRITON_DEVICE_TYPE == "cpu" and ops.TRITON_DEVICE_TYPE == "cpu"
    assert type(driver.active).__name__ == "LaunchOnlyDriver"
    assert driver.active.get_current_target() == HOPPER


def _constants(compiled) -> dict:
    """A compiled kernel's compile-time constants by parameter name."""
    names = compiled.src.fn.arg_names
    return {names[path[0]]: value for path, value in compiled.src.constants.items()}


def _tier_sources(launch: cc.Launch):
    """What the compile tier compiles for `launch` on sm_90: (source, options) per config it
    checks (the autotuned kernels' configs as the pruner keeps them, see test_compile)."""
    configs = cc.production_configs(launch, 90) if launch.name in AUTOTUNED else [None]
    return [cc.source(launch, HOPPER, config) for config in configs]


def _steps():
    """(name, step) for the compile tier's own layer steps, at its shapes (bf16)."""
    dtype, width = torch.bfloat16, 64
    for tokens in FURA_TOKENS[dtype]:
        if tokens <= 1024:
            yield f"fura-T{tokens}", cc.fura_step(tokens, 2, width, OUT, dtype)
    for tokens in NF4_TOKENS[dtype]:
        yield f"qfura-T{tokens}", cc.qfura_step(tokens, 2, width, OUT, dtype)
    for batch, (sequences, tokens) in MIXED_BATCHES.items():
        yield f"mixed-{batch}", cc.mixed_batch_step(sequences, tokens, 4, 2, width, 2 * OUT, dtype)


STEPS = dict(_steps())


@pytest.mark.parametrize("step", STEPS)
def test_the_kernels_that_run_are_the_compile_tiers_binaries(step):
    run = STEPS[step]
    plans.clear_plans()
    run()  # production: plans made through Triton's launcher, as on a GPU
    kept = plans.kept_plans()
    assert kept, f"{step}: the step kept no launch plan"
    captured = cc.capture_launches(run)  # what the compile tier compiles for this step
    for plan in kept:
        compiled = plan.compiled
        matches = [
            (source, options)
            for launch in captured
            if launch.name == compiled.src.fn.__name__
            for source, options in _tier_sources(launch)
            if source.hash() == compiled.src.hash()
        ]
        assert matches, f"{step}: {compiled.name} ({_constants(compiled)}) is not among the compile tier's builds"
        source, options = matches[0]
        tier = triton.compile(source, target=HOPPER, options=options)
        assert tier.hash == compiled.hash, f"{step}: {compiled.name} compiled with other options than the tier's"
        assert tier.asm["cubin"] == compiled.asm["cubin"], f"{step}: {compiled.name}: another cubin"


def _shapes(launched) -> list[tuple]:
    """The launches less their pointers (a step's own outputs land at new addresses each call):
    kernel, grid, block, shared memory and the integer arguments among the recorded ones."""
    kinds = {}
    for plan in plans.kept_plans():
        signature = plan.compiled.src.signature
        kinds[plan.compiled.name] = [kind for kind in signature.values() if kind != "constexpr"]
    return [(launch.name, launch.grid, launch.block, launch.shared_bytes,
             tuple(value for value, kind in zip(launch.first_arguments, kinds[launch.name], strict=False)
                   if not kind.startswith("*")))
            for launch in launched]  # fmt: skip


LAYER_METHODS = ("fura", "qfura", "fura_peft", "fura_peft_nf4")


@pytest.mark.parametrize("configuration", host.HOST_CONFIGURATIONS)
@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("case", host.layer_cases(), ids=lambda case: case.name)
def test_a_layer_step_launches_what_the_counter_reports(case, method, configuration):
    """Forward + backward of each layer of the host suite, as `bench host` times it."""
    module = host.layer_module(method, case, configuration)
    x, dy = host.layer_inputs(case, configuration)
    forward_backward, _ = host.layer_calls(module, x, dy, configuration)
    forward_backward.run()  # first call: plans made
    forward_backward.reset()
    with launch_only.recording() as direct:  # the plans' direct path, as timed
        forward_backward.run()
    forward_backward.reset()
    counter = LaunchCounter()
    with launch_only.recording() as hooked, counter:  # Triton's launcher, which calls the counter's hook
        forward_backward.run()
    assert direct, f"{method} {case.name}: nothing launched"
    assert [launch.name for launch in direct] == [op for op in counter.ops if "::" not in op], counter.ops
    assert _shapes(direct) == _shapes(hooked), f"{method} {case.name}: the direct path launched otherwise than Triton's"
    assert not [op for op in counter.ops if op.startswith("fura_kernels::")], counter.ops  # all on Triton


def test_a_mixed_batch_launches_what_the_counter_reports():
    step = cc.mixed_batch_step(16, 3, 4, 2, 32, 64, torch.bfloat16)
    step()
    with launch_only.recording() as direct:
        step()
    counter = LaunchCounter()
    with counter:
        step()
    assert [launch.name for launch in direct] == ["segmented_block_transform_kernel"]
    assert [op for op in counter.ops if "::" not in op] == ["segmented_block_transform_kernel"], counter.ops


def test_a_plan_hands_the_driver_what_tritons_launcher_does():
    """The plan's direct C call against Triton's `CompiledKernel` runner, same tensors and
    arguments: the driver receives the same function, grid, block, shared memory and arguments."""
    x = torch.randn(40, 3, 32, dtype=torch.bfloat16)
    w = torch.randn(3, 32, 48)
    s = torch.rand(3, 48)
    plans.clear_plans()
    ops.block_diag_matmul_unchecked(x, w, s, False)
    (plan,) = plans.kept_plans()
    y = torch.empty(40, 3, 48, dtype=torch.bfloat16)
    tensors = (x, w, s, y)
    with launch_only.recording() as direct:
        plan(*tensors)
    with launch_only.recording() as runner:
        plan.compiled[plan.grid](*tensors, *plan.scalars)
    assert len(direct) == 1 and direct == runner
    launch = direct[0]
    assert launch.name == "block_diag_matmul_kernel" and launch.grid == plan.grid
    assert launch.block == (32 * plan.compiled.metadata.num_warps, 1, 1)
    assert launch.shared_bytes == plan.compiled.metadata.shared
    assert launch.first_arguments[:4] == tuple(t.data_ptr() for t in tensors)
