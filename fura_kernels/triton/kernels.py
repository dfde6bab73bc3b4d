"""Triton kernels for FuRA's block-diagonal steps: K1 (forward) and K3 (backward).

Design note. FuRA's big GEMM (`z · L`, `dy · L^T`) goes to cuBLAS; what is left are `n`
independent small matmuls over blocks of width `b <= 128` (FURA_SPEC.md §3-4). They are
memory-bound: the work is reading `x` / `g` once and writing the result once. So:

- K1 gives each program one `(row tile, block, column tile)` and loads the block's weight tile
  inside the K loop (it stays L2-resident across row tiles); `x` is read through its strides,
  so strided activations and a transposed `L` (the weight-side merge) need no copy.
- K3 gives each program one `(T split, block, K tile)` and walks its rows once, producing both
  `dx_j = g_j · W_j^T` and the block gradient `G_j += x_j^T · g_j` from the same `g` tile. The
  whole output width of a block sits in one tile (`N <= 256`), so `g` is read exactly once.
  `G` is reduced over T in two fixed-order passes (per-split partials, then a sum over splits),
  with the split count a function of T only: the result is bitwise reproducible run to run.

`UPCAST` casts loaded tiles to fp32. It is set under `TRITON_INTERPRET=1`, whose bf16 `tl.dot`
is broken (FURA_SPEC.md §7); on a GPU tiles go to the tensor cores in their own dtype and
accumulate in fp32. Row offsets are int64: `T * stride` passes 2^31 at real sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_diag_matmul_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    T,
    K,
    N,
    stride_xt,
    stride_xb,
    stride_xk,
    stride_wb,
    stride_wk,
    stride_wn,
    stride_yt,
    stride_yb,
    stride_yn,
    t_bucket,  # autotune key only: T rounded to a bucket, so a new T does not re-tune
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """K1: `y[t, j, :] = x[t, j, :] @ w[j]` for every block `j`.

    x (T, nblk, K) any strides; w (nblk, K, N) any strides, same dtype as x; y (T, nblk, N).
    Grid: (cdiv(T, BLOCK_T), nblk, cdiv(N, BLOCK_N)). Accumulates in fp32, stores y's dtype.
    """
    pid_t = tl.program_id(0)
    blk = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask_n = offs_n < N
    rows = offs_t.to(tl.int64)
    x_rows = x_ptr + blk * stride_xb + rows[:, None] * stride_xt
    w_cols = w_ptr + blk * stride_wb + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    y_ptrs = y_ptr + blk * stride_yb + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


@triton.jit
def block_diag_backward_kernel(
    g_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    gw_ptr,
    T,
    K,
    N,
    rows_per_split,
    stride_gt,
    stride_gb,
    stride_gn,
    stride_xt,
    stride_xb,
    stride_xk,
    stride_wb,
    stride_wk,
    stride_wn,
    stride_dxt,
    stride_dxb,
    stride_dxk,
    stride_gws,
    stride_gwb,
    stride_gwk,
    stride_gwn,
    t_bucket,  # autotune key only
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_GW: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """K3: for every block `j`, `dx[t, j, :] = g[t, j, :] @ w[j]^T` and the partial block
    gradient `gw[s, j] = sum over rows t of split s of x[t, j, :]^T g[t, j, :]` (fp32).

    g (T, nblk, N); x (T, nblk, K) any strides; w (nblk, K, N); dx (T, nblk, K);
    gw (n_splits, nblk, K, N) fp32. Requires N <= BLOCK_N (one column tile holds a block's
    whole output width, so each `g` tile is loaded once for both products).
    Grid: (n_splits, nblk, cdiv(K, BLOCK_K)); split s covers rows [s, s+1) * rows_per_split.
    """
    pid_s = tl.program_id(0)
    blk = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    if COMPUTE_DX:
        w = tl.load(
            w_ptr + blk * stride_wb + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            w = w.to(tl.float32)
        w_t = tl.trans(w)
    gw_acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        rows = offs_t.to(tl.int64)
        g = tl.load(
            g_ptr + blk * stride_gb + rows[:, None] * stride_gt + offs_n[None, :] * stride_gn,
            mask=mask_t[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            g = g.to(tl.float32)
        if COMPUTE_DX:
            dx = tl.dot(g, w_t, input_precision=INPUT_PRECISION)
            dx_ptrs = dx_ptr + blk * stride_dxb + rows[:, None] * stride_dxt + offs_k[None, :] * stride_dxk
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_k[None, :])
        if COMPUTE_GW:
            x = tl.load(
                x_ptr + blk * stride_xb + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=mask_t[:, None] & mask_k[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
            gw_acc = tl.dot(tl.trans(x), g, gw_acc, input_precision=INPUT_PRECISION)
    if COMPUTE_GW:
        gw_ptrs = (
            gw_ptr
            + pid_s.to(tl.int64) * stride_gws
            + blk * stride_gwb
            + offs_k[:, None] * stride_gwk
            + offs_n[None, :] * stride_gwn
        )
        tl.store(gw_ptrs, gw_acc, mask=mask_k[:, None] & mask_n[None, :])
