"""Block-diagonal matmul (K1) and its backward (K3): the PyTorch implementations.

They run on the CPU, for float64, and wherever Triton cannot; the Triton launchers in
`launchers.py` follow the same contracts.

Contract, for `nblk` independent blocks, with an optional per-block `scale` folded into the
weight, `w' = w * scale` (fp32, or fp64 for fp64 inputs, then cast to the compute dtype):

    torch_block_diag_matmul(x, w, scale, scale_rows)[t, j, :] = x[t, j, :] @ w'[j]
        x: (T, nblk, k), any strides; w: (nblk, k, nout), any float dtype; scale (nblk, k) when
        `scale_rows`, else (nblk, nout); result (T, nblk, nout), x.dtype.

    torch_block_diag_backward(grad_out, x, w, scale) -> (grad_x, grad_w, grad_scale)
        w'[j] = w[j] * scale[j] (scale along nout; 1 without scale)
        grad_x[t, j, :] = grad_out[t, j, :] @ w'[j]^T      (T, nblk, k), grad_out.dtype
        G[j]            = sum_t x[t, j, :]^T grad_out[t, j, :]      at least fp32
        grad_w[j]       = G[j] * scale[j]                    (nblk, k, nout), w.dtype
        grad_scale[j]   = sum over k of G[j] * w[j]           (nblk, nout), scale.dtype

`G` stays in at least fp32 until the products that reduce it are done: rounding it to bf16 first
would throw away the precision `grad_scale`'s sum needs. The reduction over T has a fixed order
for a given shape, so results are deterministic.
"""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def fold_scale(w: torch.Tensor, scale: torch.Tensor | None, scale_rows: bool, dtype: torch.dtype) -> torch.Tensor:
    """`w * scale` (scale along w's rows or its columns) in at least fp32, then in `dtype`."""
    if scale is None:
        return w.to(dtype)
    acc = accumulate_dtype(dtype)
    s = scale.to(acc).unsqueeze(-1 if scale_rows else -2)
    return (w.to(acc) * s).to(dtype)


def torch_block_diag_matmul(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, scale_rows: bool = False
) -> torch.Tensor:
    """`out[:, j] = x[:, j] @ (w[j] * scale[j])` for every block `j` (see the module docstring)."""
    w_eff = fold_scale(w, scale, scale_rows, x.dtype)
    return torch.bmm(x.transpose(0, 1), w_eff).transpose(0, 1).contiguous()


def torch_block_diag_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    compute_grad_x: bool = True,
    compute_grad_w: bool = True,
    compute_grad_scale: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(grad_x, grad_w, grad_scale)` per block; any can be skipped (returned as None)."""
    grad_out_t = grad_out.transpose(0, 1)
    grad_x = grad_w = grad_scale = None
    if compute_grad_x:
        w_eff = fold_scale(w, scale, False, grad_out.dtype)
        grad_x = torch.bmm(grad_out_t, w_eff.transpose(1, 2)).transpose(0, 1).contiguous()
    if compute_grad_w or compute_grad_scale:
        acc = accumulate_dtype(grad_out.dtype)
        g = torch.bmm(x.transpose(0, 1).transpose(1, 2), grad_out_t).to(acc)
        if compute_grad_w:
            grad_w = (g if scale is None else g * scale.to(acc).unsqueeze(1)).to(w.dtype)
        if compute_grad_scale:
            grad_scale = (g * w.to(acc)).sum(dim=1).to(scale.dtype)
    return grad_x, grad_w, grad_scale


def torch_segmented_block_transform(
    x: torch.Tensor,
    maps: torch.Tensor,
    rows: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
) -> torch.Tensor:
    """Many adapters over one batch: `y[t, j] = x[t, j] @ maps[slot(t), j]`, or `x[t, j]` where
    the token's group has slot -1. x (T, nblk, k); maps (A, nblk, k, k); group `g` owns rows
    `rows[group_offsets[g]:group_offsets[g + 1]]` and map `group_slots[g]`. Each group is one
    `torch_block_diag_matmul` on its gathered rows, the same product a batch of that adapter
    alone computes. Reads the offsets and slots on the host (this is the CPU path)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y.copy_(x)
    offsets = group_offsets.tolist()
    for group, slot in enumerate(group_slots.tolist()):
        start, end = offsets[group], offsets[group + 1]
        if slot < 0 or start == end:
            continue
        index = rows[start:end].long()
        y[index] = torch_block_diag_matmul(x[index], maps[slot])
    return y
