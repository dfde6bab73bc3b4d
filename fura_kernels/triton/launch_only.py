"""Launch-only mode: fura-kernels' Triton path, host side only, on a machine without a GPU.

With `FURA_LAUNCH_ONLY=1` in the environment when `fura_kernels` is imported:

- the Triton path serves CPU tensors (fp16, bf16, fp32), as it serves CUDA tensors on a GPU;
- kernels compile for an H100 (`sm_90`) with Triton's own compiler and ptxas, with the configs
  production picks (the first config the pruner keeps, where a GPU would benchmark them);
- every launch runs Triton's whole launch path, Python and C: Triton's C utilities and launchers
  are compiled and linked against a stub `libcuda.so.1` (`launch_only_libcuda.c`) whose driver
  calls return at once; its `cuLaunchKernelEx` records the launch and does nothing else.

So kernel outputs are never written (they hold whatever the allocator left there: meaningless),
while everything else runs as it would: autograd, autocast, the custom ops, the optimizer, a
Hugging Face model. What this measures is what a GPU waits on when a step is host-bound: the
Python and C work of issuing the step (`python -m bench host`). `launches()` reads the stub's
record of what was launched. Nothing changes without the variable.

A C compiler is needed, as Triton needs one on a GPU machine (it builds the stub, and Triton
builds its utilities against it). The mode refuses to start where CUDA is available (the stub
would stand in for the real driver) and under `TRITON_INTERPRET=1` (a different CPU mode).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

ENV_VARIABLE = "FURA_LAUNCH_ONLY"
# Read once, when the package is imported (as TRITON_INTERPRET is): the mode cannot change later.
ENABLED = os.environ.get(ENV_VARIABLE) == "1"
# The GPU generation the kernels compile for: Hopper, an H100.
ARCH = 90
STUB_SOURCE = Path(__file__).with_name("launch_only_libcuda.c")


class Launch(NamedTuple):
    """One kernel launch as the stub driver received it: the kernel, its grid, its block (threads),
    its dynamic shared memory, and its first arguments (the first four as 64-bit values, the next
    four as their low 32 bits; see `launch_only_libcuda.c`)."""

    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    first_arguments: tuple[int, ...]


_RECORD_WORDS = 16


_library: ctypes.CDLL | None = None
# Function handle (as the stub hands them out) -> kernel name, filled as Triton loads kernels.
_names: dict[int, str] = {}


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError(
        f"{ENV_VARIABLE}=1 needs a C compiler (cc, gcc or clang, or CC=...): it builds a stub CUDA driver for "
        "Triton to link against, as Triton builds its own utilities on a GPU machine"
    )


def _stub_directory() -> Path:
    """A folder holding the stub built as `libcuda.so.1` (built once per source version)."""
    import triton

    include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    source = STUB_SOURCE.read_bytes()
    digest = hashlib.sha256(source + str(include).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fura_kernels" / "launch_only"
    folder = cache / digest
    library = folder / "libcuda.so.1"
    if library.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / "libcuda.so.1"
        command = [_compiler(), str(STUB_SOURCE), "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1",
                   f"-I{include}", "-o", str(built)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{ENV_VARIABLE}=1: building the stub CUDA driver failed:\n{result.stderr}")
        os.replace(built, library)  # atomic: a concurrent process sees the whole file or none
    return folder


def _remember_name(module, function, name, metadata_group, hash) -> None:  # noqa: A002 - Triton's hook signature
    _names[int(function)] = name


def _current_device() -> int:
    return 0


def _set_current_device(device) -> None:
    pass


def _capability(device=None) -> tuple[int, int]:
    return divmod(ARCH, 10)


def _driver_class():
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class LaunchOnlyDriver(CudaDriver):
        """Triton's CUDA driver over the stub library, answering as one H100 whose memory is the
        host's: device 0, the default stream, CPU tensors."""

        def __init__(self) -> None:
            super().__init__()  # builds Triton's C utilities, linked against the stub
            self.get_current_device = _current_device
            self.set_current_device = _set_current_device
            self.get_device_capability = _capability
            # A C-level lookup, as torch's `_cuda_getCurrentRawStream` is on a GPU, so a launch
            # costs the host here what it costs there.
            self.get_current_stream = {0: 0}.__getitem__

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        @staticmethod
        def is_active() -> bool:
            return False  # never picked by Triton's own driver discovery

    return LaunchOnlyDriver


def _enable() -> None:
    global _library
    import torch
    from triton import knobs
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            f"{ENV_VARIABLE}=1 and TRITON_INTERPRET=1 are both set: the interpreter runs the kernels on the CPU, "
            "launch-only mode compiles them for a GPU and runs none; set one of them"
        )
    if torch.cuda.is_available():
        raise RuntimeError(
            f"{ENV_VARIABLE}=1 on a machine with a CUDA GPU: launch-only mode puts a stub in place of the CUDA "
            "driver; measure on the GPU itself instead (unset the variable)"
        )
    folder = _stub_directory()
    # Loaded first and globally, so the Triton modules linked against `libcuda.so.1` bind to it.
    _library = ctypes.CDLL(str(folder / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    _library.fura_launch_only_count.restype = ctypes.c_uint64
    _library.fura_launch_only_entry.restype = ctypes.c_int
    _library.fura_launch_only_entry.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)]
    knobs.nvidia.libcuda_path = str(folder)
    knobs.runtime.kernel_load_end_hook.add(_remember_name)
    driver.set_active(_driver_class()())


def launch_count() -> int:
    """Kernels launched so far in this process (0 when the mode is off)."""
    return int(_library.fura_launch_only_count()) if _library is not None else 0


def launches(start: int = 0, stop: int | None = None) -> list[Launch]:
    """The launches numbered `start` to `stop` (default: up to now), in order."""
    if _library is None:
        return []
    stop = launch_count() if stop is None else stop
    words = (ctypes.c_uint64 * _RECORD_WORDS)()
    out = []
    for index in range(start, stop):
        if not _library.fura_launch_only_entry(index, words):
            raise ValueError(f"launch {index} has left the stub driver's log (it keeps the last ones only)")
        record = list(words)
        name = _names.get(record[0], f"<unknown kernel {record[0]}>")
        out.append(Launch(name, tuple(record[1:4]), tuple(record[4:7]), record[7], tuple(record[8:16])))
    return out


class recording:  # noqa: N801 - used as a context manager, like torch's no_grad
    """`with recording() as launched:` ... `launched` holds the launches made inside."""

    def __enter__(self) -> list[Launch]:
        self._start = launch_count()
        self.launched: list[Launch] = []
        return self.launched

    def __exit__(self, *exc) -> None:
        self.launched.extend(launches(self._start))


if ENABLED:
    _enable()
