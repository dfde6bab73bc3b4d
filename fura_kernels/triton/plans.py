"""Launch plans: a Triton kernel called straight through its compiled binary.

`kernel[grid](*args)` re-derives on every call what a layer's launch already knew the call
before: it binds the arguments, specialises each one (type, divisibility by 16, alignment),
hashes them into a cache key, finds the compiled kernel, asks for the device and the stream, and
builds launch metadata: 12-13 µs of host time a launch under Triton 3.6-3.9 (about 20 µs for K3,
whose signature is long). A layer step launches the same few specialisations over and over, so
each launcher here keys its launches on what can change between calls (token count, strides,
dtypes, device, pointer alignment), goes through Triton once for a new key (compiling,
autotuning or picking a config as usual) and keeps a `KernelPlan`: the binary Triton chose, the
grid, and every scalar argument. Later calls hand the tensors to Triton's launcher directly, the
call Triton itself ends with (1.5-3 µs).

A key must determine everything Triton specialises on, or a plan would run a binary compiled for
other arguments: the launchers put the exact value of every integer argument (or what fixes it)
and each input pointer's address modulo 16 in their keys; outputs they allocate themselves are
always aligned.

Also here: where the Triton path runs (`TRITON_DEVICE_TYPE`) and what GPU it compiles for, so
that the interpreter, launch-only mode and a real GPU differ in one place.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
from triton import knobs
from triton.runtime import driver

from . import launch_only

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The device type whose tensors the Triton kernels serve: CUDA on a GPU; the CPU under the
# interpreter (which runs the kernels there) and in launch-only mode (which only launches them).
TRITON_DEVICE_TYPE = "cpu" if INTERPRET or launch_only.ENABLED else "cuda"
# Plans kept per launcher before its table is emptied: a run whose token count changes at every
# step (packed or unpadded batches) would otherwise grow it without bound. A dropped plan costs
# one Triton launch to make again.
MAX_PLANS = 1024
# Every launcher's table of plans, so that they can be listed and emptied together.
_TABLES: list[dict] = []


def plan_table() -> dict:
    """A new, empty table of plans for one launcher (key -> KernelPlan)."""
    table: dict = {}
    _TABLES.append(table)
    return table


def kept_plans() -> list:
    """Every plan the launchers keep now."""
    return [plan for table in _TABLES for plan in table.values()]


def clear_plans() -> None:
    """Drop every plan: the next launch of each key goes through Triton again (as after a change
    of Triton's knobs a plan would not see, or to free the binaries' references)."""
    for table in _TABLES:
        table.clear()


def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability the kernels are built for on `device`: the GPU's, or launch-only
    mode's and the interpreter's (an H100, sm_90)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return divmod(launch_only.ARCH, 10)


def cdiv(a: int, b: int) -> int:
    """`ceil(a / b)` for non-negative `a` and positive `b`, in plain integer arithmetic (Triton's
    `triton.cdiv` is a `ConstexprFunction`, about 4.5 µs a call on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): `triton.next_power_of_2` without its
    `ConstexprFunction` call overhead."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


# Triton versions whose CUDA launcher this module knows how to call past its Python `__call__`
# (`_direct_launch`); others get the launcher object itself.
_DIRECT_LAUNCH_TRITON = ((3, 6), (3, 7), (3, 8), (3, 9))


def _direct_launch(launcher):
    """`go(gx, gy, gz, stream, function, metadata, args)`: the C call Triton's CUDA launcher ends
    in, or None where its layout is not known here.

    `CudaLauncher.__call__` re-derives per launch what a plan fixes: it builds two closures, asks
    for the active driver and allocates no scratch for a kernel that needs none (six Python calls
    a launch, a sixth of a K1 launch's host work). For a kernel with no global or profile scratch
    (none of ours has any) and no sanitizer, it passes the same arguments to its C function, in
    one of two layouts: per-kernel launchers (Triton 3.6) take the scratch pointers before the
    metadata and the arguments flat; the generic launcher (3.7 and later) takes them after, with
    its argument annotations and the arguments as one tuple."""
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if (
        version not in _DIRECT_LAUNCH_TRITON
        or type(launcher).__name__ != "CudaLauncher"
        or getattr(launcher, "global_scratch_size", 1) != 0
        or getattr(launcher, "profile_scratch_size", 1) != 0
        or getattr(launcher, "gsan_enabled", False)
        or not hasattr(launcher, "launch")
    ):
        return None
    launch, cooperative, pdl = launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl
    if hasattr(launcher, "arg_annotations") and hasattr(launcher, "kernel_signature"):
        annotations, signature = launcher.arg_annotations, launcher.kernel_signature

        def go(gx, gy, gz, stream, function, metadata, args):
            launch(gx, gy, gz, stream, function, cooperative, pdl, metadata, None, None, None, None, None, annotations,
                   signature, args)  # fmt: skip

        return go
    if version == (3, 6):

        def go(gx, gy, gz, stream, function, metadata, args):
            launch(gx, gy, gz, stream, function, cooperative, pdl, None, None, metadata, None, None, None, *args)

        return go
    return None


def _constexprs_in_order(kernel, positional: int, values: dict) -> tuple:
    """The kernel's parameters after the first `positional` ones (its constexprs), as values in
    signature order: Triton's launcher takes every parameter and skips the compile-time ones."""
    params = list(inspect.signature(kernel.fn).parameters.values())[positional:]
    return tuple(values[p.name] if p.name in values else p.default for p in params)


class KernelPlan:
    """One specialisation of a kernel, ready to launch: `plan(*tensors)`."""

    __slots__ = ("compiled", "grid", "scalars", "derived", "stream_of", "device_index", "_launcher", "_direct",
                 "_function", "_metadata")  # fmt: skip

    def __init__(self, compiled, kernel, grid: tuple, tensors: int, scalars: tuple, constexprs: dict, device) -> None:
        gx, gy, gz = (*grid, 1, 1)[:3]
        self.compiled = compiled  # Triton's CompiledKernel: its binary, asm and metadata
        self.grid = (gx, gy, gz)
        # Everything after the tensors: integers, then constexprs, as the kernel's signature lists them.
        self.scalars = (*scalars, *_constexprs_in_order(kernel, tensors + len(scalars), constexprs))
        # What the launcher derived from the key besides the arguments (the sizes of the buffers
        # it allocates per call), so that a repeated call derives nothing.
        self.derived: tuple = ()
        self._launcher = compiled.run  # Triton's launcher for this binary (CudaLauncher)
        self._direct = _direct_launch(self._launcher)  # its C call, where known (else None)
        self._function = compiled.function
        self._metadata = compiled.packed_metadata
        # `stream_of(device_index)`: the current stream, as Triton asks for it (a C call on a GPU).
        self.stream_of = driver.active.get_current_stream
        self.device_index = device.index if device.index is not None else 0

    def __call__(self, *tensors) -> None:
        """Launch on the current stream."""
        runtime = knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        direct = self._direct
        if direct is None or getattr(enter, "calls", enter) or getattr(leave, "calls", leave):
            self.on(self.stream_of(self.device_index), *tensors)
            return
        gx, gy, gz = self.grid
        direct(gx, gy, gz, self.stream_of(self.device_index), self._function, self._metadata, (*tensors, *self.scalars))

    def on(self, stream, *tensors) -> None:
        """Launch on `stream` (the current stream: a caller that needed it already passes it)."""
        runtime = knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if getattr(enter, "calls", enter) or getattr(leave, "calls", leave):
            # A launch hook (Triton's profiler) is installed: it wants launch metadata, which
            # Triton's own runner builds.
            self.compiled[self.grid](*tensors, *self.scalars, stream=stream)
            return
        gx, gy, gz = self.grid
        if self._direct is not None:
            self._direct(gx, gy, gz, stream, self._function, self._metadata, (*tensors, *self.scalars))
            return
        self._launcher(gx, gy, gz, stream, self._function, self._metadata, None, None, None, *tensors, *self.scalars)


def keep_plan(
    plans: dict,
    key: tuple,
    compiled,
    kernel,
    grid: tuple,
    tensors: tuple,
    scalars: tuple,
    constexprs: dict,
    derived: tuple = (),
) -> KernelPlan | None:
    """Keep the plan of `compiled` (the CompiledKernel Triton just launched for these arguments),
    with what the launcher `derived` for it. None, as Triton returns when a `jit_cache_hook` took
    the launch over, keeps nothing."""
    if compiled is None:
        return None
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plan = plans[key] = KernelPlan(compiled, kernel, grid, len(tensors), scalars, constexprs, tensors[0].device)
    plan.derived = derived
    return plan


def first_launch(
    plans: dict,
    key: tuple,
    kernel,
    grid: tuple,
    tensors: tuple,
    scalars: tuple,
    constexprs: dict,
    options: dict,
    derived: tuple = (),
) -> None:
    """Launch `kernel` through Triton (which compiles it if it must) and keep the plan for `key`,
    with what the launcher `derived` for it. Under the interpreter nothing is kept: it has no
    binary to call."""
    compiled = kernel[grid](*tensors, *scalars, **constexprs, **options)
    if not INTERPRET:
        keep_plan(plans, key, compiled, kernel, grid, tensors, scalars, constexprs, derived)
