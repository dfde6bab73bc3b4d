"""Every kernel, as production launches it, compiles for H100 (sm_90) and A100 (sm_80) on the CPU.

The launches are intercepted from the real FuRA and QFuRA layer code (`compile_check`), so the
signatures are production's: run-time K and N, the divisibility hints Triton's launcher derives,
T = 1 as the constant it becomes. On sm_90 a kernel with a dot must lower to `wgmma`, on sm_80 to
`mma.sync`; every kernel must fit in shared memory, not spill, and keep some register headroom,
so that a newer Triton's slightly different allocation does not tip it into spilling.
FURA_SPEC.md §7 explains the mechanism.
"""

from __future__ import annotations

import functools
import os
import re

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real GPU code; not under the interpreter"
)

from fura_kernels.triton import autotuning  # noqa: E402

from . import compile_check as cc  # noqa: E402

ARCHS = [90, 80]
DTYPES = [torch.bfloat16, torch.float16]
# The block widths FuRA meets on Llama-3-8B and Qwen3 (b and r of 64, 96, 128). Two blocks and
# 128 output features keep every size a multiple of 16, as Llama's and Qwen's are, so the
# specialisations are theirs (only that property of a run-time size reaches the compiler).
WIDTHS = [64, 96, 128]
OUT = 128
# Registers per thread a kernel may use: 255 is the hardware's limit, where ptxas starts to
# spill. A kernel at 250 compiles today and spills under the next Triton (seen: the NF4 GEMM at
# 255 under Triton 3.8 on sm_80), so production configs must leave this much room.
MAX_REGISTERS = 240
# A stack this small with no local-memory access inside any loop is one value ptxas parks
# across a branch, once per program (seen: the decode kernel at 80 registers under Triton 3.9),
# not register pressure; anything larger, or any spill traffic in a loop, fails.
MAX_STACK_OUTSIDE_LOOPS = 16


# Token counts that give every specialisation production meets: T = 1 (a constant to Triton),
# T not a multiple of 16 with K3 in one split (a constant too), and T large enough for the
# weight-side merge and for K3 in several splits (2, then 16: a multiple of 16). fp16 lowers
# like bf16 but for the MMA's type: its large-T launches stand for the rest (compile time).
FURA_TOKENS = {torch.bfloat16: (1, 33, 1024, 8192), torch.float16: (8192,)}
# The NF4 kernels' token counts: decode at T = 1 (a constant) and 2; the fused kernels' three
# tiles (16, 32, 64 tokens) with T divisible by 16 or not; the dequantisation pass (T > 64).
NF4_TOKENS = {torch.bfloat16: (1, 2, 5, 16, 32, 33, 64, 2 * OUT), torch.float16: (2, 33, 2 * OUT)}


@functools.cache
def fura_launches() -> tuple[cc.Launch, ...]:
    """K1 (activation side at T <= out, weight-side merge above) and K3, as a FuRA layer's
    training step launches them, one per distinct specialisation."""
    launches = []
    for width in WIDTHS:
        for dtype in DTYPES:
            for tokens in FURA_TOKENS[dtype]:
                launches += cc.fura_step_launches(tokens, 2, width, OUT, dtype)
    return tuple(cc.distinct(launches))


@functools.cache
def qfura_launches(arch: int = 90) -> tuple[cc.Launch, ...]:
    """The NF4 kernels as a QFuRA layer's step launches them on `sm_<arch>`: decode (T = 1, a
    constant, and T = 2..4), the fused tensor-core kernels (T = 5..64) and the dequantisation
    pass (T > 64)."""
    launches = []
    for dtype in DTYPES:
        for tokens in NF4_TOKENS[dtype]:
            launches += [
                launch
                for launch in cc.qfura_step_launches(tokens, 2, 64, OUT, dtype, arch)
                if launch.name.startswith("nf4_")
            ]
    return tuple(cc.distinct(launches))


# Mixed-adapter batches as served: decode (one token a sequence) and prefill, over 4 adapters.
MIXED_BATCHES = {"decode": (64, 1), "prefill": (16, 33)}


@functools.cache
def mixed_launches() -> tuple[cc.Launch, ...]:
    """The segmented transform as a FuRA PEFT layer launches it for decode and prefill batches."""
    launches = []
    for width in WIDTHS:
        for dtype in DTYPES:
            for sequences, tokens in MIXED_BATCHES.values():
                launches += cc.mixed_batch_launches(sequences, tokens, 4, 2, width, 2 * OUT, dtype)
    return tuple(cc.distinct(launches))


def _of(launches, name: str) -> list[cc.Launch]:
    found = [launch for launch in launches if launch.name == name]
    assert found, f"the layer code launched no {name}"
    return found


def _check(kernel: cc.CompiledKernel, what: str, mma: bool | None = True) -> None:
    assert kernel.shared_bytes <= cc.SHARED_LIMIT[kernel.arch], f"{what}: {kernel.shared_bytes} B of shared memory"
    spilled = kernel.local_accesses_in_loops
    assert not spilled, f"{what}: spill traffic inside a loop: {spilled[:3]}"
    assert kernel.stack_bytes <= MAX_STACK_OUTSIDE_LOOPS and kernel.local_bytes == 0, (
        f"{what}: spills (stack {kernel.stack_bytes} B, local {kernel.local_bytes} B)"
    )
    assert kernel.registers <= MAX_REGISTERS, f"{what}: {kernel.registers} registers, over {MAX_REGISTERS}"
    if mma is None:  # either MMA: Triton picks mma.sync on sm_90 for tiles too short for wgmma
        pass
    elif not mma:
        assert not kernel.uses_mma_sync and not kernel.uses_wgmma, f"{what}: uses MMA"
    elif kernel.arch == 90:
        assert kernel.uses_wgmma, f"{what}: no wgmma on sm_90"
    else:
        assert kernel.uses_mma_sync and not kernel.uses_wgmma, f"{what}: expected mma.sync only on sm_80"


def _check_tuned(kernel: cc.CompiledKernel, what: str, run, listed) -> None:
    """`_check` for an autotuned launch: a listed config as listed must reach its generation's
    MMA; clamped to a small launch (tiles under wgmma's 64 rows), either MMA will do, but a
    tensor-core one."""
    if run.kwargs == listed.kwargs:
        _check(kernel, what)
        return
    assert kernel.uses_mma_sync or kernel.uses_wgmma, f"{what}: not on the tensor cores"
    _check(kernel, what, mma=None)


HOPPER = cc.GPUTarget("cuda", 90, 32)


def _spec(launch: cc.Launch) -> cc.Specialised:
    return cc.specialise(launch, HOPPER)


def _describe(launch: cc.Launch) -> str:
    spec = _spec(launch)
    dtype = next(v for k, v in spec.signature.items() if k in ("x_ptr", "g_ptr", "a_ptr", "out_ptr"))
    constants = {k: v for k, v in spec.constexprs.items() if type(v) is int}
    return f"{launch.name} {dtype} {constants}"


def _ids(cfg):
    return "x".join(str(v) for v in cfg.kwargs.values()) + f"-w{cfg.num_warps}-s{cfg.num_stages}"


def test_the_layer_code_launches_every_kernel_family():
    """What is compiled below is what the layers launch: both K1 layouts, K3, and the five NF4 kernels."""
    k1 = _of(fura_launches(), "block_diag_matmul_kernel")
    layouts = {_spec(launch).constexprs["SCALE"] for launch in k1}
    assert layouts == {1, 2}  # S on R^T's rows (the merge) and on R's columns (the activation side)
    _of(fura_launches(), "block_diag_backward_kernel")
    names = {launch.name for launch in qfura_launches()}
    assert names == {"nf4_decode_kernel", "nf4_decode_t_kernel", "nf4_matmul_kernel", "nf4_matmul_t_kernel",
                     "nf4_dequantize_kernel"}  # fmt: skip
    # An A100 gets the fused kernels with 64-value K tiles (nf4_launchers.FUSED_TILES).
    for arch, block_k in ((90, 128), (80, 64)):
        assert {_spec(launch).constexprs["BLOCK_K"] for launch in _of(qfura_launches(arch), "nf4_matmul_kernel")} == {
            block_k
        }
    # T = 1 is specialised to a constant by Triton's launcher: a kernel of its own.
    decode = _of(qfura_launches(), "nf4_decode_kernel")
    assert {_spec(launch).signature["T"] for launch in decode} == {"constexpr", "i32"}


def test_run_time_sizes_are_compiled_as_run_time():
    """K and N reach K1 as run-time integers (with the divisibility hint), not as constants: the
    loop over K is then pipelined, with the shared memory that takes (65-140 KB, not 16-41 KB)."""
    launch = _of(fura_launches(), "block_diag_matmul_kernel")[0]
    spec = _spec(launch)
    assert spec.signature["K"] == "i32" and spec.signature["N"] == "i32"
    compiled = cc.compile_launch(launch, 90, autotuning.K1_CONFIGS[0])
    assert compiled.shared_bytes >= 64 * 1024


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("cfg", autotuning.K1_CONFIGS, ids=_ids)
def test_k1_compiles(cfg, arch):
    """Each listed config as production runs it on each launch: clamped to the launch's shape
    by the autotuner's pruning (`cc.production_configs`)."""
    for launch in _of(fura_launches(), "block_diag_matmul_kernel"):
        for run in cc.production_configs(launch, arch, [cfg]):
            _check_tuned(cc.compile_launch(launch, arch, run), f"{_describe(launch)} {_ids(run)} sm_{arch}", run, cfg)


@pytest.mark.parametrize(
    "arch, cfg",
    [(90, c) for c in autotuning.K3_CONFIGS_HOPPER] + [(80, c) for c in autotuning.K3_CONFIGS_AMPERE],
    ids=lambda v: f"sm{v}" if isinstance(v, int) else _ids(v),
)
def test_k3_compiles(arch, cfg):
    assert autotuning.k3_configs_for(arch // 10) == (
        autotuning.K3_CONFIGS_HOPPER if arch == 90 else autotuning.K3_CONFIGS_AMPERE
    )
    for launch in _of(fura_launches(), "block_diag_backward_kernel"):
        for run in cc.production_configs(launch, arch, [cfg]):
            _check_tuned(cc.compile_launch(launch, arch, run), f"{_describe(launch)} {_ids(run)} sm_{arch}", run, cfg)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_segmented_transform_compiles(arch):
    """One launch per mixed batch whatever its adapters: row tiles of 16 (decode) to 64 (prefill)
    tokens on the tensor cores, whole blocks up to b = 128 in one column tile."""
    launches = _of(mixed_launches(), "segmented_block_transform_kernel")
    assert {_spec(launch).constexprs["BLOCK_T"] for launch in launches} == {16, 64}
    for launch in launches:
        compiled = cc.compile_launch(launch, arch)
        what = f"{_describe(launch)} sm_{arch}"
        assert compiled.uses_mma_sync or compiled.uses_wgmma, f"{what}: the map product is not on the tensor cores"
        _check(compiled, what, mma=None)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("kernel", ["nf4_matmul_kernel", "nf4_matmul_t_kernel"], ids=["a@Lt^T", "a@Lt"])
def test_nf4_fused_gemm_compiles(arch, kernel):
    for launch in _of(qfura_launches(arch), kernel):
        _check(cc.compile_launch(launch, arch), f"{_describe(launch)} sm_{arch}")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_nf4_dequantize_compiles(arch):
    for launch in _of(qfura_launches(arch), "nf4_dequantize_kernel"):
        _check(cc.compile_launch(launch, arch), f"{_describe(launch)} sm_{arch}", mma=False)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("kernel", ["nf4_decode_kernel", "nf4_decode_t_kernel"], ids=["a@Lt^T", "a@Lt"])
def test_nf4_decode_compiles(arch, kernel):
    """The decode kernels (T <= 4): packed codes arrive in 16-byte vector loads, the math stays on
    CUDA cores (no MMA, so nothing is padded to 16 tokens), no spills on sm_90 or sm_80."""
    for launch in _of(qfura_launches(arch), kernel):
        compiled = cc.compile_launch(launch, arch)
        what = f"{_describe(launch)} sm_{arch}"
        assert "ld.global.v4.b32" in compiled.ptx, f"{what}: no 16-byte loads"
        _check(compiled, what, mma=False)


# The decode kernels as a Llama-3-8B layer launches them: cores with rows of K = 4096 values (q,
# k, v, o, gate, up: 64 scale blocks a row, two warps a program) and 14336 (down: 224 blocks, one
# warp), 256 rows tall so that the `a @ Lt` kernel splits its rows.
DECODE_SHAPES = {4096: (32, 128), 14336: (112, 128)}
DECODE_ROWS = 256
# Issue slots a weight may take in a decode kernel's main loop, by token block (T = 1, 2, 3-4).
# At 0.52 bytes a weight, an H100 (3.35 TB/s, 132 SMs x 4 schedulers x 1.98 GHz) keeps up with
# the memory at about 5 instructions a weight; the target is 8 at T = 1 (the old kernels took
# 37-49). Each further token adds one FMA a weight by construction, so T = 2 and 4 get ceilings
# that catch a regression, not the target.
SASS_CEILINGS = {
    "nf4_decode_kernel": {1: 8.0, 2: 9.0, 4: 12.0},
    "nf4_decode_t_kernel": {1: 9.0, 2: 10.0, 4: 13.0},
}


@functools.cache
def llama_decode_launches(arch: int) -> tuple[cc.Launch, ...]:
    launches = []
    for dtype in DTYPES:
        for tokens in (1, 2, 3):
            for n, b in DECODE_SHAPES.values():
                launches += [
                    launch
                    for launch in cc.qfura_step_launches(tokens, n, b, DECODE_ROWS, dtype, arch)
                    if launch.name.startswith("nf4_decode")
                ]
    return tuple(cc.distinct(launches))


def _weights_per_iteration(launch: cc.Launch) -> int:
    """NF4 weights one thread decodes in one iteration of the kernel's main loop (the kernels'
    docstrings): `a @ Lt^T` takes 4 rows x GROUPS blocks of 64 a step over 32 * warps threads;
    `a @ Lt` one row of a 32-column strip a thread."""
    spec = _spec(launch)
    threads = 32 * launch.kwargs["num_warps"]
    if launch.name == "nf4_decode_kernel":
        return 4 * 64 * spec.constexprs["GROUPS"] // threads
    return spec.constexprs["BLOCK_N"] * 32 // threads


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_nf4_decode_sass_instructions_per_weight(arch, capsys):
    """The decode kernels' main loops, counted in the machine code (Triton's own ptxas and
    cuobjdump): instructions per NF4 weight, at most 8 for `a @ Lt^T` at T = 1 on sm_90 and sm_80.
    Printed per kernel, dtype, K and token block (`pytest tests/kernels -k sass`)."""
    import triton

    launches = llama_decode_launches(arch)
    assert {launch.name for launch in launches} == set(SASS_CEILINGS)
    over = []
    for launch in launches:
        compiled = cc.compile_launch(launch, arch)
        block_t = _spec(launch).constexprs["BLOCK_T"]
        per_weight = len(compiled.main_loop) / _weights_per_iteration(launch)
        ceiling = SASS_CEILINGS[launch.name][block_t]
        line = (f"triton {triton.__version__} sm_{arch} {_describe(launch)}: {len(compiled.main_loop)} instructions "
                f"a loop iteration, {per_weight:.2f} per weight (at most {ceiling})")  # fmt: skip
        with capsys.disabled():
            print(line)
        if per_weight > ceiling:
            over.append(line)
    assert not over, "\n".join(over)


def _ttir_between_store_and_ticket(ttir: str) -> str:
    """The TTIR between the last store before the arrival ticket (`tt.atomic_rmw`) and the ticket."""
    ticket = ttir.index("tt.atomic_rmw")
    store = ttir.rindex("tt.store", 0, ticket)
    return ttir[store:ticket]


@pytest.mark.parametrize(
    "family, kernel",
    [("fura", "block_diag_backward_kernel"), ("qfura", "nf4_decode_t_kernel")],
    ids=["K3", "nf4-decode-reduction"],
)
def test_partials_are_ordered_before_the_arrival_ticket(family, kernel):
    """The last-arriving program reads the others' partials after taking its ticket. The ticket's
    release is one thread's; the other threads' partial stores are ordered before it only by a
    CTA barrier, which the source must ask for (`tl.debug_barrier()`), not leave to a barrier
    Triton happens to emit for a shared-memory slot. Checked in the IR before lowering (the
    source's own barrier) and in the PTX (a `bar.sync` between the stores and the atomic)."""
    import triton

    launches = fura_launches() if family == "fura" else llama_decode_launches(90)
    launch = next(launch for launch in _of(launches, kernel) if _spec(launch).signature["n_splits"] != "constexpr")
    config = autotuning.K3_CONFIGS_HOPPER[0] if family == "fura" else None
    source, options = cc.source(launch, HOPPER, config)
    compiled = triton.compile(source, target=HOPPER, options=options)
    between = _ttir_between_store_and_ticket(compiled.asm["ttir"])
    assert re.search(r"\b(gpu|ttg)\.barrier\b", between), f"{kernel}: no barrier in the source"
    ptx = compiled.asm["ptx"]
    atom = re.search(r"atom\.[a-z.]*acq_rel[a-z.]*\.add", ptx) or re.search(r"atom\.[a-z.]*\.add", ptx)
    assert atom, f"{kernel}: no atomic ticket in the PTX"
    before = ptx[: atom.start()]
    last_store = max(before.rfind("st.global"), 0)
    assert re.search(r"\b(bar|barrier)\.sync", before[last_store:]), f"{kernel}: no bar.sync before the ticket"


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (8, 6)], ids=lambda c: f"sm{c[0]}{c[1]}")
@pytest.mark.parametrize("tokens", [1, 512, 16384])
@pytest.mark.parametrize("width", WIDTHS + [16, 300])
def test_config_pruning_fits_every_gpu(capability, tokens, width):
    """The autotuners' pruning, run as on a GPU: never empty, always within shared memory, K3 on
    its generation's list, tiles no larger than the problem needs."""
    bucket = autotuning.t_bucket(tokens)
    k1 = autotuning.select_k1(autotuning.K1_CONFIGS, width, width, bucket, 2, capability)
    assert k1 and all(autotuning.k1_shared_bytes(c, 2) <= autotuning.shared_memory_limit(capability) for c in k1)
    assert all(c.kwargs["BLOCK_K"] <= autotuning.tile_cap(width) for c in k1)
    block_n = autotuning.tile_cap(min(width, autotuning.MAX_FUSED_N))
    k3 = autotuning.select_k3(autotuning.K3_CONFIGS, width, block_n, bucket, 2, capability)
    allowed = autotuning.K3_CONFIGS_HOPPER if capability[0] >= 9 else autotuning.K3_CONFIGS_AMPERE
    assert k3 and all(c.num_warps in {a.num_warps for a in allowed} for c in k3)
    assert all(autotuning.k3_shared_bytes(c, block_n, 2) <= autotuning.shared_memory_limit(capability) for c in k3)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_last_resort_configs_compile(arch):
    """The minimal configs pruning falls back to on small-shared-memory GPUs build and fit too,
    up to K3's widest fused block (256)."""
    launches = cc.fura_step_launches(32, 2, autotuning.MAX_FUSED_N, OUT, torch.bfloat16)
    for launch in launches:
        config = autotuning.K1_MINIMAL if launch.name == "block_diag_matmul_kernel" else autotuning.K3_MINIMAL
        kernel = cc.compile_launch(launch, arch, config)
        assert kernel.shared_bytes <= 99 * 1024 and not kernel.spills, f"{_describe(launch)} sm_{arch}"
