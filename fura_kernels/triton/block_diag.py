"""Block-diagonal matmul (K1) and its backward (K3): the PyTorch implementations.

They run on the CPU, for float64, and wherever Triton cannot; the Triton launchers in
`launchers.py` follow the same contracts.

Contract, for `nblk` independent blocks:

    torch_block_diag_matmul(x, w)[t, j, :] = x[t, j, :] @ w[j]
        x: (T, nblk, k), any strides; w: (nblk, k, nout); result (T, nblk, nout), x.dtype.

    torch_block_diag_backward(grad_out, x, w) -> (grad_x, grad_w)
        grad_x[t, j, :] = grad_out[t, j, :] @ w[j]^T          (T, nblk, k), grad_out.dtype
        grad_w[j]       = sum_t x[t, j, :]^T grad_out[t, j, :]  (nblk, k, nout), accumulate_dtype

`accumulate_dtype(dtype)` is float32 for half inputs and the input's dtype for float32/64.
`grad_w` is returned in it because callers reduce it further (dS is a column sum of
`grad_w ⊙ w`); rounding it to bf16 first would throw away the precision the reduction needs.
The reduction over T has a fixed order for a given shape, so results are deterministic.
"""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _check(x: torch.Tensor, w: torch.Tensor, op: str) -> None:
    if x.dim() != 3 or w.dim() != 3 or x.shape[1] != w.shape[0] or x.shape[2] != w.shape[1]:
        raise ValueError(
            f"{op}: expected x (T, nblk, k) and w (nblk, k, nout), got x {tuple(x.shape)} and w {tuple(w.shape)}"
        )


def torch_block_diag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`out[:, j] = x[:, j] @ w[j]` for every block `j` (see the module docstring)."""
    _check(x, w, "block_diag_matmul")
    return torch.bmm(x.transpose(0, 1), w.to(x.dtype)).transpose(0, 1).contiguous()


def torch_block_diag_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    compute_grad_x: bool = True,
    compute_grad_w: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(grad_out @ w^T, x^T @ grad_out)` per block; either can be skipped (returned as None)."""
    nblk, k, nout = w.shape
    if grad_out.dim() != 3 or grad_out.shape[1:] != (nblk, nout):
        raise ValueError(
            f"block_diag_matmul_backward: expected grad_out (T, {nblk}, {nout}), got {tuple(grad_out.shape)}"
        )
    grad_out_t = grad_out.transpose(0, 1)
    grad_x = grad_w = None
    if compute_grad_x:
        grad_x = torch.bmm(grad_out_t, w.to(grad_out.dtype).transpose(1, 2)).transpose(0, 1).contiguous()
    if compute_grad_w:
        if x is None:
            raise ValueError("block_diag_matmul_backward: compute_grad_w needs the forward input x")
        _check(x, w, "block_diag_matmul_backward")
        grad_w = torch.bmm(x.transpose(0, 1).transpose(1, 2), grad_out_t).to(accumulate_dtype(grad_out.dtype))
    return grad_x, grad_w
