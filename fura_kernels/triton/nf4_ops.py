"""NF4 as `torch.library` custom ops: the dispatch decision, made once, inside the op.

`nf4_matmul(a, state, transpose)` picks, by token count and layout, one of:

- the decode kernels (T <= DECODE_MAX_T): CUDA-core FMAs, one launch, no MMA padding;
- the fused tensor-core kernels (T <= SMALL_T_MAX, rows of whole 64-value scale blocks);
- dequantise-then-GEMM above that (cuBLAS beats a dequantise-in-GEMM kernel on Hopper);

on the Triton path, and PyTorch otherwise. `nf4_merge` builds the weight-side merge
`W_eff = Lt · blockdiag(R · diag(S))^T` from the NF4 core, and `nf4_dequantize` the dense core.
A dequantised core never leaves the op that made it: it is an ordinary allocation, freed as
soon as the op's GEMM is issued, so PyTorch's caching allocator hands the same block to the
next layer (one core-sized buffer at a time, per stream and thread-safe, with no shared buffer
of ours that two streams or threads could race on, and nothing a compiler could reorder).

The ops take the NF4 state as tensors (`state_args`) plus its shape and dtype, have fake
implementations (so a QFuRA model compiles with `fullgraph=True`) and FLOP formulas; the bytes
they move are `nf4_bytes_moved`.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import register_flop_formula

from ..nf4 import NF4Tensor
from .nf4_torch import torch_nf4_dequantize, torch_nf4_matmul
from .ops import block_diag_matmul_unchecked, dispatch_free, triton_serves, use_triton

try:
    from . import nf4_launchers
except ImportError:  # no triton: PyTorch paths only
    nf4_launchers = None

# Above this many tokens, dequantise-then-cuBLAS beats a dequantise-in-GEMM kernel on Hopper
# (FURA_SPEC.md §4); at or below it the fused kernel reads 0.52 bytes per weight instead of 2.
SMALL_T_MAX = 64
# At or below this many tokens, the decode kernels (no MMA) replace the tensor-core ones, whose
# smallest MMA pads the tokens to 16. Where the crossover really lies is for a GPU to measure.
DECODE_MAX_T = 4
_WARNED: set[tuple[int, int]] = set()


def nf4_path(state: NF4Tensor, tokens: int, a: torch.Tensor) -> str:
    """Which implementation serves `a` (`tokens` rows) against this core: "decode", "fused",
    "dequantize" (Triton dequantisation, then a GEMM) or "torch"."""
    if nf4_launchers is None or not use_triton(a):
        return "torch"
    if tokens <= SMALL_T_MAX and tokens > 0:
        if state.shape[1] % state.blocksize == 0:
            # The decode kernels read the codes as 32-bit words.
            decode = tokens <= DECODE_MAX_T and state.packed.data_ptr() % 4 == 0
            return "decode" if decode else "fused"
        if state.shape not in _WARNED:
            _WARNED.add(state.shape)
            warnings.warn(
                f"NF4 core of shape {state.shape}: rows of {state.shape[1]} values are not a multiple of 64, so the "
                "fused small-T kernels cannot run; dequantising the core for every call instead",
                stacklevel=4,
            )
    return "dequantize"


# --- the state as op arguments --------------------------------------------------------------
def state_args(state: NF4Tensor) -> tuple:
    """`(packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype)` for the ops."""
    return (state.packed, state.absmax, state.offset, state.nested_absmax, state.nested_code, *state.shape, state.dtype)


def _state(packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype) -> NF4Tensor:
    return NF4Tensor(packed=packed, absmax=absmax, shape=(rows, cols), dtype=dtype, offset=offset,
                     nested_absmax=nested_absmax, nested_code=nested_code)  # fmt: skip


def _dequantize(state: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh (N, K) tensor: freed by the caller's op as soon as its GEMM is issued."""
    if nf4_launchers is not None and triton_serves(dtype, state.device) and dtype in nf4_launchers.DTYPE_NAMES:
        out = torch.empty(state.shape, dtype=dtype, device=state.device)
        nf4_launchers.triton_nf4_dequantize(state, dtype, out)
        return out
    return torch_nf4_dequantize(state, dtype)


def _matmul_impl(a: torch.Tensor, state: NF4Tensor, transpose: bool) -> torch.Tensor:
    path = nf4_path(state, a.shape[0], a)
    if path == "decode":
        return nf4_launchers.triton_nf4_decode(a, state, transpose)
    if path == "fused":
        return nf4_launchers.triton_nf4_matmul(a, state, transpose)
    if path == "dequantize":
        dense = _dequantize(state, a.dtype)
        return a @ dense if transpose else a @ dense.t()
    return torch_nf4_matmul(a, state, transpose)


def _merge_impl(state: NF4Tensor, w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    rows = state.shape[0]
    nblk, b, r = w.shape
    lt = _dequantize(state, dtype)
    merged = block_diag_matmul_unchecked(lt.reshape(rows, nblk, r), w.transpose(1, 2), scale, True)
    return merged.reshape(rows, nblk * b)


# --- registration -----------------------------------------------------------------------------
@torch.library.custom_op("fura_kernels::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    a: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    transpose: bool,
) -> torch.Tensor:
    state = _state(packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype)
    return _matmul_impl(a, state, transpose)


@_nf4_matmul_op.register_fake
def _(a, packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype, transpose):
    return a.new_empty((a.shape[0], cols if transpose else rows))


@torch.library.custom_op("fura_kernels::nf4_merge", mutates_args=())
def _nf4_merge_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    state = _state(packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype)
    return _merge_impl(state, w, scale, compute_dtype)


@_nf4_merge_op.register_fake
def _(packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype, w, scale, compute_dtype):
    return w.new_empty((rows, w.shape[0] * w.shape[1]), dtype=compute_dtype)


@torch.library.custom_op("fura_kernels::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    state = _state(packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype)
    return _dequantize(state, out_dtype)


@_nf4_dequantize_op.register_fake
def _(packed, absmax, offset, nested_absmax, nested_code, rows, cols, dtype, out_dtype):
    return packed.new_empty((rows, cols), dtype=out_dtype)


@register_flop_formula(torch.ops.fura_kernels.nf4_matmul)
def _nf4_matmul_flops(a_shape, *args, **kwargs) -> int:
    rows, cols = args[5], args[6]
    return 2 * a_shape[0] * rows * cols


@register_flop_formula(torch.ops.fura_kernels.nf4_merge)
def _nf4_merge_flops(*args, **kwargs) -> int:
    rows, w_shape = args[5], args[8]
    return 2 * rows * w_shape[0] * w_shape[1] * w_shape[2]


def nf4_bytes_moved(state: NF4Tensor, tokens: int, elem: int, transpose: bool = False) -> int:
    """Bytes an `nf4_matmul` must move at least: the packed core and its scales, the activation
    read and the output written (the roofline floor of FURA_SPEC.md §3)."""
    rows, cols = state.shape
    return state.storage_bytes() + tokens * (rows + cols) * elem


# --- public functions -------------------------------------------------------------------------
def nf4_matmul(a: torch.Tensor, state: NF4Tensor, transpose: bool = False) -> torch.Tensor:
    """`a @ Lt^T` (a: (T, K) -> (T, N)), or with `transpose`, `a @ Lt` (a: (T, N) -> (T, K)), Lt the
    NF4 core (N, K), in a's dtype. The op decides the kernel (see the module docstring)."""
    rows, cols = state.shape
    if a.dim() != 2 or a.shape[1] != (rows if transpose else cols):
        raise ValueError(f"nf4_matmul: a of shape {tuple(a.shape)} does not match the NF4 core {state.shape}")
    return nf4_matmul_unchecked(a, state, transpose)


def nf4_matmul_unchecked(a: torch.Tensor, state: NF4Tensor, transpose: bool = False) -> torch.Tensor:
    """`nf4_matmul` for callers whose shapes are right by construction (QFuRA's Function)."""
    if dispatch_free(a, state.packed, state.absmax, state.offset, state.nested_absmax, state.nested_code):
        return _matmul_impl(a, state, transpose)
    return _nf4_matmul_op(a, *state_args(state), transpose)


def nf4_merge(state: NF4Tensor, w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight-side merge of QFuRA, `W_eff[:, j] = Lt_j · (R_j · diag(S_j))^T` (out x n*b), in
    `dtype`; w is R (n, b, r) in its fp32 storage, scale S as (n, r)."""
    if dispatch_free(w, scale, state.packed, state.absmax, state.offset, state.nested_absmax, state.nested_code):
        return _merge_impl(state, w, scale, dtype)
    return _nf4_merge_op(*state_args(state), w, scale, dtype)


def nf4_dequantize(state: NF4Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, K) core in `dtype`; with `out` (N*K or more contiguous elements), written into it
    (eager only, for benchmarks that reuse one buffer) and a view of its head returned."""
    if out is not None:
        target = out.reshape(-1)[: state.numel]
        if nf4_launchers is not None and use_triton(target) and dtype in nf4_launchers.DTYPE_NAMES:
            nf4_launchers.triton_nf4_dequantize(state, dtype, target)
        else:
            target.copy_(torch_nf4_dequantize(state, dtype).reshape(-1))
        return target.view(state.shape)
    if dispatch_free(state.packed, state.absmax, state.offset, state.nested_absmax, state.nested_code):
        return _dequantize(state, dtype)
    return _nf4_dequantize_op(*state_args(state), dtype)


__all__ = [
    "DECODE_MAX_T",
    "SMALL_T_MAX",
    "nf4_bytes_moved",
    "nf4_dequantize",
    "nf4_matmul",
    "nf4_matmul_unchecked",
    "nf4_merge",
    "nf4_path",
]
