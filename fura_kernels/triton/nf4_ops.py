"""Launchers for the NF4 kernels, with PyTorch fallbacks: tensors in, tensors out.

`nf4_dequantize` writes a frozen core into a caller-provided buffer (the layers share one
scratch buffer, so no bf16 copy of any core stays alive); `nf4_matmul` is the fused small-T
GEMM. Both run Triton where `use_triton` says so and `fura_kernels.nf4` otherwise.
"""

from __future__ import annotations

import functools

import torch

from ..nf4 import NF4Tensor, dequantize_nf4, nf4_code
from .ops import use_triton

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

try:
    import triton

    from . import autotuning
    from .nf4_kernels import nf4_dequantize_kernel, nf4_matmul_kernel, nf4_matmul_t_kernel
except ImportError:  # no triton: PyTorch paths only
    triton = None

# Above this many tokens, dequantise-then-cuBLAS beats a dequantise-in-GEMM kernel on Hopper
# (FURA_SPEC.md §4); at or below it the fused kernel reads 0.52 bytes per weight instead of 2.
SMALL_T_MAX = 64
# Scale blocks (64 values, 32 bytes) per program of the dequantisation pass: 32 blocks make
# 1 KB of codes per program, enough bytes in flight per program to hide the scale lookups.
DEQUANT_GROUPS = 32
# Fused GEMM tiles: 64 rows of the dequantised core as the MMA's M side (wgmma's minimum).
# K tiles of 128 values are 64 bytes per row, read once, and split into even and odd columns
# (64 each): the dot's K side, and in the transposed kernel its M side, stay at 64. 8 warps:
# with 4, the T <= 32 and T <= 64 tiles spill on sm_90 and sm_80 (8 to 120 B of stack);
# 2 stages, double buffering (tests/kernels/test_compile.py checks spills and shared memory).
NF4_BLOCK_N = 64
NF4_BLOCK_K = 128
NF4_WARPS = 8
NF4_STAGES = 2
# The reduction axis is split so that about NF4_TARGET_PROGRAMS programs run (a few per SM
# on a large GPU: one tile of a 4096-row core is only 64 programs), in splits of at least
# NF4_MIN_SPLIT values and at most NF4_MAX_SPLITS of them. The count is a function of the
# shape alone, so the fixed-order sum of partials is reproducible on any GPU.
NF4_TARGET_PROGRAMS = 512
NF4_MAX_SPLITS = 16
NF4_MIN_SPLIT = 512


def fused_nf4_supported(state: NF4Tensor, tokens: int) -> bool:
    """Whether the fused small-T kernel applies: few tokens and rows a whole number of 64-value
    scale blocks (a block must not straddle two rows of a tile)."""
    return tokens <= SMALL_T_MAX and state.shape[1] % state.blocksize == 0


@functools.cache
def _levels(device: torch.device) -> torch.Tensor:
    """The NF4 level table on `device`, built once (not copied to the device at every launch)."""
    return nf4_code(device)


def _scale_args(state: NF4Tensor, device: torch.device):
    """Kernel pointers for the scales. The double-quantisation offset stays a device tensor: a
    Python float would cost a GPU-to-host sync per launch."""
    levels = _levels(torch.device(device))
    if state.double_quant:
        return levels, state.nested_code, state.nested_absmax, state.offset
    # Unused when DOUBLE_QUANT is off: any valid pointer will do.
    return levels, levels, levels, levels


def nf4_dequantize(state: NF4Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, K) core in `dtype`, written into `out` (a contiguous buffer of N*K or more
    elements; a view of its head is returned) or into a new tensor."""
    rows, cols = state.shape
    numel = rows * cols
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=state.device)
    target = out.reshape(-1)[:numel]
    if triton is not None and use_triton(target) and dtype in DTYPE_NAMES:
        levels, nested_code, nested_absmax, offset = _scale_args(state, target.device)
        grid = (triton.cdiv(numel, 64 * DEQUANT_GROUPS),)
        # No fused multiply-add: `code * absmax2 + offset` must round like bitsandbytes' two steps.
        exact = {} if autotuning.INTERPRET else {"enable_fp_fusion": False}
        nf4_dequantize_kernel[grid](state.packed, state.absmax, levels, nested_code, nested_absmax, offset, target,
                                    numel, (numel + 1) // 2, GROUPS=DEQUANT_GROUPS, DOUBLE_QUANT=state.double_quant,
                                    OUT_DTYPE=DTYPE_NAMES[dtype], **exact)  # fmt: skip
    else:
        target.copy_(dequantize_nf4(state, dtype).reshape(-1))
    return target.view(rows, cols)


def _splits(length: int, step: int, out_tiles: int) -> tuple[int, int]:
    """(values per split, a multiple of `step`; split count) for a reduction of `length`."""
    wanted = min(NF4_MAX_SPLITS, triton.cdiv(NF4_TARGET_PROGRAMS, out_tiles), triton.cdiv(length, NF4_MIN_SPLIT))
    per_split = triton.cdiv(triton.cdiv(length, max(wanted, 1)), step) * step
    return per_split, triton.cdiv(length, per_split)


def nf4_matmul(a: torch.Tensor, state: NF4Tensor, transpose: bool = False) -> torch.Tensor:
    """`a @ Lt^T` (a: (T, K) -> (T, N)), or with `transpose`, `a @ Lt` (a: (T, N) -> (T, K)),
    Lt the NF4 core (N, K). Fused (dequantise in the K loop) for T <= SMALL_T_MAX on the
    Triton path; otherwise dequantise, then a dense matmul. Output in `a.dtype`."""
    rows, cols = state.shape
    tokens = a.shape[0]
    if a.dim() != 2 or a.shape[1] != (rows if transpose else cols):
        raise ValueError(f"nf4_matmul: a of shape {tuple(a.shape)} does not match the NF4 core {state.shape}")
    if triton is None or not use_triton(a) or not fused_nf4_supported(state, tokens) or tokens == 0:
        dense = nf4_dequantize(state, a.dtype)
        return a @ dense if transpose else a @ dense.t()
    levels, nested_code, nested_absmax, offset = _scale_args(state, a.device)
    block_t = max(autotuning.MIN_TILE, triton.next_power_of_2(tokens))
    if transpose:  # reduce over the core's rows, in steps of BLOCK_N; output tiles of BLOCK_K columns
        out_len, per_split, splits = cols, *_splits(rows, NF4_BLOCK_N, triton.cdiv(cols, NF4_BLOCK_K))
    else:  # reduce over its columns, in steps of BLOCK_K; output tiles of BLOCK_N rows
        out_len, per_split, splits = rows, *_splits(cols, NF4_BLOCK_K, triton.cdiv(rows, NF4_BLOCK_N))
    partial = torch.empty((splits, out_len, block_t), dtype=torch.float32, device=a.device)
    meta = dict(BLOCK_N=NF4_BLOCK_N, BLOCK_K=NF4_BLOCK_K, BLOCK_T=block_t, DOUBLE_QUANT=state.double_quant,
                L_DTYPE=DTYPE_NAMES.get(state.dtype, "fp32"), UPCAST=autotuning.INTERPRET)  # fmt: skip
    launch = dict(num_warps=NF4_WARPS, num_stages=NF4_STAGES) if not autotuning.INTERPRET else {}
    args = (a, state.packed, state.absmax, levels, nested_code, nested_absmax, offset, partial, tokens, rows, cols,
            per_split, *a.stride())  # fmt: skip
    if transpose:
        grid = (triton.cdiv(cols, NF4_BLOCK_K), splits)
        nf4_matmul_t_kernel[grid](*args, **meta, **launch)
    else:
        grid = (triton.cdiv(rows, NF4_BLOCK_N), splits)
        nf4_matmul_kernel[grid](*args, **meta, **launch)
    # Second pass of the reduction, in a fixed order; then (out, T) -> (T, out).
    total = partial[0] if splits == 1 else partial.sum(dim=0)
    return total[:, :tokens].t().to(a.dtype)


class ScratchPool:
    """Reusable dequantisation buffers, one per (device, dtype), grown to the largest request.

    Every QFuRA layer dequantises its core into the same buffer just before the GEMM that
    reads it and never keeps the result, so a model holds one core-sized bf16 buffer at most,
    not one per layer. Call `release()` to free it. Single-stream use only: a second CUDA
    stream running another QFuRA layer concurrently would race on the buffer.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (torch.device(device), dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the old one before allocating the larger one
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer

    def release(self) -> None:
        self._buffers.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


SCRATCH = ScratchPool()
