"""Python launchers for K1 and K3: tensors in, tensors out (no autograd state here).

Same contracts as the PyTorch implementations in `block_diag.py`, which remain the CPU path
and the reference fallback.
"""

from __future__ import annotations

import torch
import triton

from . import autotuning as at
from .kernels import block_diag_backward_kernel, block_diag_matmul_kernel

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_k1_tuned = triton.autotune(
    configs=at.K1_CONFIGS,
    key=["t_bucket", "K", "N"],
    prune_configs_by={"early_config_prune": at.prune_k1},
)(block_diag_matmul_kernel)

_k3_tuned = triton.autotune(
    configs=at.K3_CONFIGS,
    key=["t_bucket", "K", "N", "COMPUTE_DX", "COMPUTE_GW"],
    prune_configs_by={"early_config_prune": at.prune_k3},
)(block_diag_backward_kernel)


def _check_operands(x: torch.Tensor, w: torch.Tensor, op: str) -> None:
    if x.dim() != 3 or w.dim() != 3 or x.shape[1] != w.shape[0] or x.shape[2] != w.shape[1]:
        raise ValueError(f"{op}: expected x (T, nblk, K) and w (nblk, K, N), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in TRITON_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"{op}: expected x and w of one dtype among {TRITON_DTYPES}, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"{op}: x is on {x.device} but w is on {w.device}")


def triton_block_diag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """K1: `y[:, j] = x[:, j] @ w[j]`. x (T, nblk, K) any strides, w (nblk, K, N) any strides."""
    _check_operands(x, w, "triton_block_diag_matmul")
    tokens, nblk, k = x.shape
    n = w.shape[2]
    y = torch.empty((tokens, nblk, n), dtype=x.dtype, device=x.device)
    if tokens == 0 or nblk == 0 or n == 0:
        return y
    args = (x, w, y, tokens, k, n, *x.stride(), *w.stride(), *y.stride(), at.t_bucket(tokens))
    precision = at.input_precision(x.dtype)
    if at.INTERPRET:
        meta = at.K1_INTERPRET_META
        grid = (triton.cdiv(tokens, meta["BLOCK_T"]), nblk, triton.cdiv(n, meta["BLOCK_N"]))
        block_diag_matmul_kernel[grid](*args, **meta, UPCAST=True, INPUT_PRECISION=precision)
    else:

        def grid(meta):
            return (triton.cdiv(tokens, meta["BLOCK_T"]), nblk, triton.cdiv(n, meta["BLOCK_N"]))

        _k1_tuned[grid](*args, UPCAST=False, INPUT_PRECISION=precision)
    return y


def triton_block_diag_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    compute_grad_x: bool = True,
    compute_grad_w: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """K3: `(grad_out @ w^T, x^T @ grad_out)` per block, the second in fp32, reduced over T in
    a fixed order. Needs `w.shape[2] <= MAX_FUSED_N` (see `autotuning`)."""
    _check_operands(grad_out, w.transpose(1, 2), "triton_block_diag_backward")
    tokens, nblk, n = grad_out.shape
    k = w.shape[1]
    if n > at.MAX_FUSED_N:
        raise ValueError(f"triton_block_diag_backward: block output width {n} exceeds MAX_FUSED_N={at.MAX_FUSED_N}")
    if compute_grad_w:
        if x is None:
            raise ValueError("triton_block_diag_backward: compute_grad_w needs the forward input x")
        _check_operands(x, w, "triton_block_diag_backward")
    device = grad_out.device
    grad_x = torch.empty((tokens, nblk, k), dtype=grad_out.dtype, device=device) if compute_grad_x else None
    rows_per_split, n_splits = at.split_rows(tokens)
    partial = torch.empty((n_splits, nblk, k, n), dtype=torch.float32, device=device) if compute_grad_w else None
    if not (compute_grad_x or compute_grad_w):
        return None, None
    if tokens == 0:
        return grad_x, (torch.zeros((nblk, k, n), dtype=torch.float32, device=device) if compute_grad_w else None)
    # Unused outputs get a placeholder pointer; the constexpr flags compile their code away.
    dx_arg = grad_x if grad_x is not None else grad_out
    gw_arg = partial if partial is not None else grad_out
    x_arg = x if x is not None else grad_out
    dx_strides = grad_x.stride() if grad_x is not None else (0, 0, 0)
    x_strides = x.stride() if x is not None else (0, 0, 0)
    gw_strides = partial.stride() if partial is not None else (0, 0, 0, 0)
    args = (
        grad_out,
        x_arg,
        w,
        dx_arg,
        gw_arg,
        tokens,
        k,
        n,
        rows_per_split,
        *grad_out.stride(),
        *x_strides,
        *w.stride(),
        *dx_strides,
        *gw_strides,
        at.t_bucket(tokens),
    )
    flags = dict(
        BLOCK_N=at.tile_cap(n),
        COMPUTE_DX=compute_grad_x,
        COMPUTE_GW=compute_grad_w,
        INPUT_PRECISION=at.input_precision(grad_out.dtype),
    )
    if at.INTERPRET:
        meta = at.K3_INTERPRET_META
        grid = (n_splits, nblk, triton.cdiv(k, meta["BLOCK_K"]))
        block_diag_backward_kernel[grid](*args, **meta, **flags, UPCAST=True)
    else:

        def grid(meta):
            return (n_splits, nblk, triton.cdiv(k, meta["BLOCK_K"]))

        _k3_tuned[grid](*args, **flags, UPCAST=False)
    grad_w = None
    if compute_grad_w:
        # Second pass of the deterministic reduction: a plain sum over the split axis.
        grad_w = partial[0] if n_splits == 1 else partial.sum(dim=0)
    return grad_x, grad_w
