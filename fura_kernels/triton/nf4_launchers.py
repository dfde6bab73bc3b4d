"""Python launchers of the NF4 kernels: tensors in, tensors out (no autograd state here).

Contracts as in `nf4_torch.py`, the PyTorch implementations; which one runs, and which kernel,
is decided once, in `nf4_ops.py`. Each launcher keys its launches and keeps a launch plan per
key, as `launchers.py` does (see `plans.py`): a repeated launch is a lookup and one call of
Triton's launcher.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..nf4 import NF4Tensor, nf4_code
from . import autotuning
from .launchers import counters_for, persistent_buffer
from .nf4_kernels import (
    nf4_decode_kernel,
    nf4_decode_t_kernel,
    nf4_dequantize_kernel,
    nf4_matmul_kernel,
    nf4_matmul_t_kernel,
)
from .plans import INTERPRET, cdiv, first_launch, next_power_of_2, plan_table

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Scale blocks (64 values, 32 bytes) per program of the dequantisation pass: 32 blocks make
# 1 KB of codes per program, enough bytes in flight per program to hide the scale lookups.
DEQUANT_GROUPS = 32
# Fused tensor-core GEMM tiles: 64 rows of the dequantised core as the MMA's M side (wgmma's
# minimum). A K tile of BLOCK_K values is BLOCK_K / 2 bytes per row, read once and split into
# even and odd columns. 8 warps: with 4, the T <= 32 and T <= 64 tiles spill on sm_90 and sm_80
# (8 to 120 B of stack); 2 stages, double buffering. The K tile depends on the GPU generation:
# - Hopper: 128 values (64 bytes a row); the dot's K side, and in the transposed kernel its M
#   side, stay at 64.
# - Ampere: mma.sync keeps the operand fragments in registers, and with 128-value tiles the
#   T <= 64 kernels sit at 254-255 registers of 255 and spill under Triton 3.8 (8 B of stack);
#   64-value tiles need at most 180 under Triton 3.6-3.9.
# (tests/kernels/test_compile.py compiles both as production launches them: spills, registers,
# shared memory.)
NF4_BLOCK_N = 64


@dataclass(frozen=True)
class FusedTiles:
    block_k: int
    num_warps: int
    num_stages: int


FUSED_TILES = {"hopper": FusedTiles(128, 8, 2), "ampere": FusedTiles(64, 8, 2)}
# The split of the reduction is computed as if every GPU took 128-value K tiles (a multiple of
# both), so an A100 and an H100 group the partial sums alike: the split stays a function of the
# shape alone.
SPLIT_TILE_K = 128


@functools.cache
def capability_major(device: torch.device) -> int:
    """The GPU generation the kernels are built for (9, Hopper, off a GPU: the interpreter)."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9


def fused_tiles(major: int) -> FusedTiles:
    """The fused kernels' K tile and launch shape for a GPU generation."""
    return FUSED_TILES["hopper" if major >= 9 else "ampere"]


# The reduction axis is split so that about NF4_TARGET_PROGRAMS programs run (a few per SM
# on a large GPU: one tile of a 4096-row core is only 64 programs), in splits of at least
# NF4_MIN_SPLIT values and at most NF4_MAX_SPLITS of them. The count is a function of the
# shape alone, so the fixed-order sum of partials is reproducible on any GPU.
NF4_TARGET_PROGRAMS = 512
NF4_MAX_SPLITS = 16
NF4_MIN_SPLIT = 512
# Decode kernels (T <= 4, nf4_kernels.py): the token count is compiled in (1, 2 or 4), so T = 1
# computes one product per weight. `a · Lt^T`: 4 rows a program (N / 4 programs: 1024 on a
# 4096-row core), one scale block a thread per step; the warps are the most of 4, 2, 1 whose
# 32 * warps blocks divide a row, so no step is partly masked (K = 4096: 2 warps; 14336: 1).
# `a · Lt`: a strip of 32 columns a program, DECODE_T_WARPS * 32 rows a step (one a thread),
# the rows split for about NF4_TARGET_PROGRAMS programs.
DECODE_ROWS = 4
DECODE_T_WARPS = 4
DECODE_T_STRIP = 32
# Decode NF4 by byte permutes (PTX) on the GPU; off, the kernels read the level table and round
# in Triton instead (the interpreter's path: the same weights, far more instructions). A switch
# so that the GPU tier can check the two paths give the same bits.
BYTE_PERMUTE = True


def decode_token_block(tokens: int) -> int:
    """The decode kernels' token block: the real T, rounded up to 1, 2 or 4."""
    return 1 if tokens == 1 else 2 if tokens == 2 else 4


def decode_warps(blocks_per_row: int) -> tuple[int, bool]:
    """(warps, whether every step is whole) of the `a · Lt^T` decode kernel for rows of
    `blocks_per_row` scale blocks."""
    for warps in (4, 2, 1):
        if blocks_per_row % (32 * warps) == 0:
            return warps, True
    return 1, False


@functools.cache
def levels(device: torch.device) -> torch.Tensor:
    """The NF4 level table on `device`, built once (not copied to the device at every launch),
    outside any CUDA-graph pool (see `launchers.persistent_buffer`)."""
    if device.type != "cuda":
        return nf4_code(device)
    return persistent_buffer(device, lambda: nf4_code(device), "NF4 level table")


def _scale_args(state: NF4Tensor, device: torch.device):
    """Kernel pointers for the scales. The double-quantisation offset stays a device tensor: a
    Python float would cost a GPU-to-host sync per launch."""
    table = levels(torch.device(device))
    if state.double_quant:
        return state.nested_code, state.nested_absmax, state.offset
    return table, table, table  # unused when DOUBLE_QUANT is off: any valid pointer will do


# Launch plans of every NF4 kernel (each key begins with the kernel's name).
_PLANS: dict[tuple, object] = plan_table()


def _state_key(state: NF4Tensor) -> tuple:
    """What a launch key needs of a state: its shape, dtype, format and buffer alignments."""
    key = (state.shape, state.dtype, state.double_quant, state.packed.data_ptr() & 15, state.absmax.data_ptr() & 15)
    if state.double_quant:
        key += (state.offset.data_ptr() & 15, state.nested_absmax.data_ptr() & 15, state.nested_code.data_ptr() & 15)
    return key


def triton_nf4_dequantize(state: NF4Tensor, dtype: torch.dtype, target: torch.Tensor) -> None:
    """Write the (N, K) core into `target` (N*K contiguous elements of `dtype`)."""
    nested_code, nested_absmax, offset = _scale_args(state, target.device)
    tensors = (state.packed, state.absmax, levels(target.device), nested_code, nested_absmax, offset, target)
    key = ("dequantize", *_state_key(state), dtype, target.device, target.data_ptr() & 15)
    plan = _PLANS.get(key)
    if plan is not None:
        plan(*tensors)
        return
    numel = state.numel
    grid = (cdiv(numel, 64 * DEQUANT_GROUPS),)
    # No fused multiply-add: `code * absmax2 + offset` must round like bitsandbytes' two steps.
    exact = {} if INTERPRET else {"enable_fp_fusion": False}
    constexprs = dict(GROUPS=DEQUANT_GROUPS, DOUBLE_QUANT=state.double_quant, OUT_DTYPE=DTYPE_NAMES[dtype])
    first_launch(_PLANS, key, nf4_dequantize_kernel, grid, tensors, (numel, (numel + 1) // 2), constexprs, exact)


def _splits(length: int, step: int, out_tiles: int) -> tuple[int, int]:
    """(values per split, a multiple of `step`; split count) for a reduction of `length`."""
    wanted = min(NF4_MAX_SPLITS, cdiv(NF4_TARGET_PROGRAMS, out_tiles), cdiv(length, NF4_MIN_SPLIT))
    per_split = cdiv(cdiv(length, max(wanted, 1)), step) * step
    return per_split, cdiv(length, per_split)


def triton_nf4_matmul(a: torch.Tensor, state: NF4Tensor, transpose: bool) -> torch.Tensor:
    """The tensor-core kernels (5 <= T <= 64): `a @ Lt^T`, or `a @ Lt` with `transpose`. The
    result is contiguous (T, out), as the op's fake says."""
    rows, cols = state.shape
    tokens = a.shape[0]
    nested_code, nested_absmax, offset = _scale_args(state, a.device)
    key = ("matmul", *_state_key(state), transpose, a.shape, a.stride(), a.dtype, a.device, a.data_ptr() & 15)
    plan = _PLANS.get(key)
    out_len = cols if transpose else rows
    if plan is not None:
        splits, block_t = plan.derived
    else:
        block_t = max(autotuning.MIN_TILE, next_power_of_2(tokens))
        tiles = fused_tiles(capability_major(a.device))
        if transpose:  # reduce over the core's rows, in steps of BLOCK_N; output tiles of BLOCK_K columns
            per_split, splits = _splits(rows, NF4_BLOCK_N, cdiv(cols, SPLIT_TILE_K))
        else:  # reduce over its columns, in steps of BLOCK_K; output tiles of BLOCK_N rows
            per_split, splits = _splits(cols, SPLIT_TILE_K, cdiv(rows, NF4_BLOCK_N))
    partial = torch.empty((splits, out_len, block_t), dtype=torch.float32, device=a.device)
    tensors = (a, state.packed, state.absmax, levels(a.device), nested_code, nested_absmax, offset, partial)
    if plan is not None:
        plan(*tensors)
    else:
        constexprs = dict(BLOCK_N=NF4_BLOCK_N, BLOCK_K=tiles.block_k, BLOCK_T=block_t, DOUBLE_QUANT=state.double_quant,
                          L_DTYPE=DTYPE_NAMES.get(state.dtype, "fp32"), UPCAST=INTERPRET)  # fmt: skip
        options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages) if not INTERPRET else {}
        scalars = (tokens, rows, cols, per_split, *a.stride())
        if transpose:
            kernel, grid = nf4_matmul_t_kernel, (cdiv(cols, tiles.block_k), splits)
        else:
            kernel, grid = nf4_matmul_kernel, (cdiv(rows, NF4_BLOCK_N), splits)
        first_launch(_PLANS, key, kernel, grid, tensors, scalars, constexprs, options, (splits, block_t))
    # Second pass of the reduction, in a fixed order; then (out, T) -> (T, out), written into a
    # contiguous result in a's dtype (one copy: the transpose and the cast together).
    total = partial[0] if splits == 1 else partial.sum(dim=0)
    out = a.new_empty((tokens, out_len))
    out.copy_(total[:, :tokens].t())
    return out


def decode_splits(rows: int, cols: int) -> tuple[int, int]:
    """(rows per split, split count) of the `a @ Lt` decode kernel: a function of the shape."""
    strips = cols // DECODE_T_STRIP
    step = 32 * DECODE_T_WARPS
    wanted = max(1, min(cdiv(NF4_TARGET_PROGRAMS, strips), cdiv(rows, step)))
    per_split = cdiv(cdiv(rows, wanted), step) * step
    return per_split, cdiv(rows, per_split)


def triton_nf4_decode(a: torch.Tensor, state: NF4Tensor, transpose: bool) -> torch.Tensor:
    """The decode kernels (T <= 4), one launch each: `a @ Lt^T`, or `a @ Lt`."""
    rows, cols = state.shape
    tokens = a.shape[0]
    nested_code, nested_absmax, offset = _scale_args(state, a.device)
    scales = (state.absmax, levels(a.device), nested_code, nested_absmax, offset)
    key = ("decode", *_state_key(state), transpose, a.shape, a.stride(), a.dtype, a.device, a.data_ptr() & 15)
    plan = _PLANS.get(key)
    l_dtype = DTYPE_NAMES.get(state.dtype, "fp32")
    # Byte-permute decoding is PTX (GPU only) and looks up 16-bit values (bf16 and fp16 cores).
    meta = dict(BLOCK_T=decode_token_block(tokens), DOUBLE_QUANT=state.double_quant, L_DTYPE=l_dtype,
                PERMUTE=BYTE_PERMUTE and not INTERPRET and l_dtype != "fp32")  # fmt: skip
    if not transpose:
        y = a.new_empty((tokens, rows))
        tensors = (a, state.packed, *scales, y)
        if plan is not None:
            plan(*tensors)
            return y
        warps, even = decode_warps(cols // 64)
        launch = {} if INTERPRET else {"num_warps": warps}
        a_vec = 16 // a.element_size() if a.stride(1) == 1 else 1
        scalars = (tokens, rows, cols // 64, *a.stride(), *y.stride())
        first_launch(_PLANS, key, nf4_decode_kernel, (cdiv(rows, DECODE_ROWS),), tensors, scalars,
                     dict(GROUPS=32 * warps, EVEN_K=even, A_VEC=a_vec, **meta), launch)  # fmt: skip
        return y
    out = a.new_empty((tokens, cols))
    per_split, splits = decode_splits(rows, cols)
    strips = cols // DECODE_T_STRIP
    partial = a.new_empty((splits, meta["BLOCK_T"], cols), dtype=torch.float32) if splits > 1 else out
    counters = counters_for(strips, a.device)
    tensors = (a, state.packed, *scales, partial, counters, out)
    if plan is not None:
        plan(*tensors)
        return out
    launch = {} if INTERPRET else {"num_warps": DECODE_T_WARPS}
    scalars = (tokens, rows, cols // 64, per_split, splits, *a.stride(), *out.stride())
    first_launch(_PLANS, key, nf4_decode_t_kernel, (strips, splits), tensors, scalars,
                 dict(BLOCK_N=32 * DECODE_T_WARPS, **meta), launch)  # fmt: skip
    return out
