"""Compile the kernels for a GPU architecture on a CPU-only machine, exactly as production
launches them, and read what came out.

Test tooling (tests/kernels/test_compile.py): it lives beside the tests, not in the package.

Triton can lower a kernel to PTX and a cubin for `sm_90` (H100) or `sm_80` (A100) with no GPU
present, using the ptxas its wheel ships (FURA_SPEC.md §7). What gets compiled must be what
runs: a run-time `K` of 64 is not the constant 64 (the loop is pipelined over an unknown trip
count, with other shared memory and registers). So nothing here writes a signature by hand.
`capture_launches` runs the real layer code (`FuRALinearFunction`, `QFuRALinearFunction`) on CPU
tensors with the Triton path switched on and every kernel launch intercepted where it enters
Triton (a launcher's first launch of a key, which would otherwise make its launch plan); `compile_launch`
then specialises the intercepted arguments with Triton's own rule (`native_specialize_impl`, as
its launcher does: an integer 1 becomes a constant, integers and pointers divisible by 16 get
the divisibility hint) and compiles that. Run-time sizes only enter through those properties,
so small layers whose sizes keep them (multiples of 16) compile to the same code as Llama's.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, native_specialize_impl

from fura_kernels.triton import launchers, ops, plans

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass
class CompiledKernel:
    arch: int
    ptx: str
    shared_bytes: int
    registers: int
    stack_bytes: int
    local_bytes: int
    sass: str = field(default="", repr=False)

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def uses_mma_sync(self) -> bool:
        return "mma.sync.aligned" in self.ptx

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    @property
    def loops(self) -> list[list[str]]:
        """The machine code's loops, each as its instructions: a loop is the span from a backward
        branch's target to the branch (FURA_SPEC.md §7)."""
        code = [(int(m.group(1), 16), line.strip()) for line in self.sass.splitlines()
                if (m := re.search(r"/\*([0-9a-f]{4,})\*/\s+\S", line))]  # fmt: skip
        spans = []
        for address, line in code:
            branch = re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", line)
            if branch and int(branch.group(1), 16) <= address:
                spans.append((int(branch.group(1), 16), address))
        return [[line for address, line in code if start <= address <= end] for start, end in spans]

    @property
    def main_loop(self) -> list[str]:
        """The longest loop: a kernel's hot loop (the others are epilogues, such as a sum of
        split partials)."""
        return max(self.loops, key=len, default=[])

    @property
    def local_accesses_in_loops(self) -> list[str]:
        """Local-memory loads and stores (spill traffic) inside a loop of the machine code."""
        return [line for loop in self.loops for line in loop if re.search(r"\b(LDL|STL)\b", line)]


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel, its positional arguments, and the
    keyword arguments (constexprs and launch options). `tuned`: K1 and K3 go through an
    autotuner, whose chosen config adds the tile constexprs, `num_warps` and `num_stages`."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    tuned: bool

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) from the cuobjdump that ships inside Triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout

    def number(name: str) -> int:
        match = re.search(rf"\b{name}:(\d+)", text)
        if match is None:
            raise RuntimeError(f"cuobjdump printed no {name}: {text!r}")
        return int(match.group(1))

    return number("REG"), number("STACK"), number("LOCAL")


def sass(cubin: bytes) -> str:
    """The machine code of a cubin, as Triton's bundled cuobjdump prints it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def _intercepted(calls: list[Launch]):
    """The Triton path switched on for CPU tensors, and every launch recorded instead of run (no
    launch plan is kept: Triton returns no kernel)."""

    def record_tuned(plans, key, tuned, kernel, grid_of, tensors, scalars, meta, select, derived=()):
        calls.append(Launch(kernel, (*tensors, *scalars), dict(meta), True))

    def record_run(self, *args, grid, warmup, **kwargs):
        calls.append(Launch(self, tuple(args), dict(kwargs), False))

    plans.clear_plans()  # a kept plan would launch its key without entering Triton
    saved = ops.TRITON_DEVICE_TYPE, ops._on_triton_device, launchers._first_tuned_launch, JITFunction.run
    ops.TRITON_DEVICE_TYPE, ops._on_triton_device = "cpu", operator.attrgetter("is_cpu")
    launchers._first_tuned_launch, JITFunction.run = record_tuned, record_run
    try:
        yield
    finally:
        ops.TRITON_DEVICE_TYPE, ops._on_triton_device, launchers._first_tuned_launch, JITFunction.run = saved


def capture_launches(fn) -> list[Launch]:
    """The kernel launches `fn()` makes through the production launchers (outputs are left
    unwritten: the values computed from them are meaningless, their shapes and strides are not)."""
    calls: list[Launch] = []
    with _intercepted(calls):
        fn()
    return calls


def fura_step(tokens: int, n: int, b: int, out: int, dtype: torch.dtype):
    """A default-layout FuRA layer's forward and backward (S folded into R, R and S trained), as a
    call: K1 and K3, activation side when `tokens <= out`, the weight-side merge above."""
    from fura_kernels.autograd.fura_linear import FuRALinearFunction

    x = torch.randn(tokens, n * b, dtype=dtype, requires_grad=True)
    btt_l = torch.randn(1, n * b, out, dtype=dtype)
    btt_r = torch.randn(n, b, b, requires_grad=True)
    btt_s = torch.rand(1, n, b, requires_grad=True)

    def step():
        FuRALinearFunction.apply(x, btt_l, btt_r, btt_s, None).float().sum().backward()

    return step


def fura_step_launches(tokens: int, n: int, b: int, out: int, dtype: torch.dtype) -> list[Launch]:
    """K1 and K3 as `fura_step` launches them."""
    return capture_launches(fura_step(tokens, n, b, out, dtype))


def qfura_step(tokens: int, n: int, b: int, out: int, dtype: torch.dtype, arch: int = 90):
    """A QFuRA layer's forward and backward as a call, with the NF4 kernels (and K1/K3) a GPU of
    `sm_<arch>` gets (the fused kernels' tiles depend on the generation)."""
    from fura_kernels.autograd.qfura_linear import qfura_linear
    from fura_kernels.nf4 import quantize_nf4
    from fura_kernels.triton import nf4_launchers

    state = quantize_nf4(torch.randn(out, n * b).to(dtype), double_quant=True)
    x = torch.randn(tokens, n * b, dtype=dtype, requires_grad=True)
    btt_r = torch.randn(n, b, b, requires_grad=True)
    btt_s = torch.rand(1, n, b, requires_grad=True)

    def step():
        saved = nf4_launchers.capability_major
        nf4_launchers.capability_major = lambda device: arch // 10
        try:
            qfura_linear(x, state, btt_r, btt_s).float().sum().backward()
        finally:
            nf4_launchers.capability_major = saved

    return step


def qfura_step_launches(tokens: int, n: int, b: int, out: int, dtype: torch.dtype, arch: int = 90) -> list[Launch]:
    """The NF4 kernels (and K1/K3) as `qfura_step` launches them."""
    return capture_launches(qfura_step(tokens, n, b, out, dtype, arch))


def mixed_batch_step(
    sequences: int, tokens_per_sequence: int, adapters: int, n: int, b: int, out: int, dtype: torch.dtype
):
    """A FuRA PEFT layer's forward over a mixed batch of `sequences` sequences spread round-robin
    over `adapters` adapters (and the base model), as a call: the segmented transform."""
    from fura_kernels.peft import FuRALinear, FuRAPeftConfig
    from fura_kernels.peft.mixed import BASE_ADAPTER, MixedBatch

    config = FuRAPeftConfig(target_modules=["base"], input_factorization=[n, b], progress_bar=False)
    layer = FuRALinear(torch.nn.Linear(n * b, out).to(dtype), "a0", config)
    names = [f"a{k}" for k in range(adapters)]
    for name in names[1:]:
        layer.update_layer(name, config)
    per_sequence = [(names + [BASE_ADAPTER])[i % (adapters + 1)] for i in range(sequences)]
    mixed = MixedBatch(per_sequence, tuple(names))
    x = torch.randn(sequences, tokens_per_sequence, n * b, dtype=dtype)
    return lambda: layer(x, fura_mixed_batch=mixed)


def mixed_batch_launches(
    sequences: int, tokens_per_sequence: int, adapters: int, n: int, b: int, out: int, dtype: torch.dtype
) -> list[Launch]:
    """The segmented transform as `mixed_batch_step` launches it."""
    return capture_launches(mixed_batch_step(sequences, tokens_per_sequence, adapters, n, b, out, dtype))


@dataclass
class Specialised:
    """A launch as Triton's launcher specialises it: each argument's type (`constexpr` for a
    constant), the constants by name, the hints by argument index, and the compile options."""

    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def specialise(launch: Launch, target: GPUTarget, config: triton.Config | None = None) -> Specialised:
    """The specialisation Triton's launcher would make of this launch on `target`."""
    backend = make_backend(target)
    params = launch.kernel.params
    names = [p.name for p in params]
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    bound = dict(zip(names, launch.args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(params):
        value = bound[param.name] if param.name in bound else param.default
        # Triton's launcher gives every parameter an attribute list, empty where there is no
        # hint: the lists enter the source's hash, so the cache key is production's too.
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            attrs[(i,)] = []
            continue
        kind, desc = native_specialize_impl(
            backend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        attrs[(i,)] = backend.parse_attr(desc) if desc and kind != "constexpr" else []
    options = {k: v for k, v in kwargs.items() if k not in names}
    return Specialised(signature, constexprs, attrs, options)


def source(launch: Launch, target: GPUTarget, config: triton.Config | None = None) -> tuple[ASTSource, dict]:
    """The ASTSource and options Triton's launcher would compile for this launch on `target`."""
    spec = specialise(launch, target, config)
    return ASTSource(fn=launch.kernel, signature=spec.signature, constexprs=spec.constexprs,
                     attrs=spec.attrs), spec.options  # fmt: skip


def compile_launch(launch: Launch, arch: int, config: triton.Config | None = None) -> CompiledKernel:
    """Compile one intercepted launch for `sm_<arch>` (with an autotune `config` for K1/K3)."""
    target = GPUTarget("cuda", arch, 32)
    src, options = source(launch, target, config)
    compiled = triton.compile(src, target=target, options=options)
    regs, stack, local = _resource_usage(compiled.asm["cubin"])
    return CompiledKernel(arch, compiled.asm["ptx"], compiled.metadata.shared, regs, stack, local,
                          sass(compiled.asm["cubin"]))  # fmt: skip


def production_configs(launch: Launch, arch: int, configs: list[triton.Config] | None = None) -> list[triton.Config]:
    """The configs a GPU of `sm_<arch>` may run for an autotuned launch (K1, K3): `configs`
    (default: the kernel's whole list) as the autotuner's pruning hook keeps them for this
    launch, tiles clamped to its shape and fitting in shared memory. These, not the listed
    configs themselves, are what production compiles."""
    from fura_kernels.triton import autotuning as at

    named = dict(zip(launch.kernel.arg_names, launch.args, strict=False))
    named.update(launch.kwargs)
    capability = divmod(arch, 10)
    if launch.name == "block_diag_matmul_kernel":
        configs = at.K1_CONFIGS if configs is None else configs
        elem = named["x_ptr"].element_size()
        return at.select_k1(configs, named["K"], named["N"], named["t_bucket"], elem, capability)
    if launch.name == "block_diag_backward_kernel":
        configs = at.k3_configs_for(arch // 10) if configs is None else configs
        block_n = named.get("BLOCK_N", at.tile_cap(named["N"]))
        elem = named["g_ptr"].element_size()
        return at.select_k3(configs, named["K"], block_n, named["t_bucket"], elem, capability)
    raise ValueError(f"{launch.name} is not autotuned")


def specialisation(launch: Launch) -> tuple:
    """What makes two launches compile to the same code: the kernel, its argument types and
    hints, and its constexprs."""
    spec = specialise(launch, GPUTarget("cuda", 90, 32))
    constants = tuple(sorted((k, str(v)) for k, v in spec.constexprs.items()))
    return (launch.name, tuple(sorted(spec.signature.items())), constants, str(sorted(spec.attrs.items())),
            tuple(sorted(spec.options.items())))  # fmt: skip


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct specialisation, in first-seen order."""
    seen, out = set(), []
    for launch in launches:
        key = specialisation(launch)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out
