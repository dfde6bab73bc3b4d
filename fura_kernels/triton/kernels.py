"""Triton kernels for FuRA's block-diagonal steps: K1 (forward) and K3 (backward).

Design note. FuRA's big GEMM (`z · L`, `dy · L^T`) goes to cuBLAS; what is left are `n`
independent small matmuls over blocks of width `b <= 128` (FURA_SPEC.md §3-4). They are
memory-bound: the work is reading `x` / `g` once and writing the result once. So:

- Both kernels take the trained core `R` in its storage dtype (fp32) and the singular values
  `S` as a per-block scale, and fold `R' = R · diag(S)` on the fly, in fp32, casting once to the
  compute dtype before the dot: a training step launches no cast and no fold (FURA_SPEC.md §3).
- K1 gives each program one `(row tile, block, column tile)` and loads the block's weight tile
  inside the K loop (it stays L2-resident across row tiles); `x` is read through its strides,
  so strided activations and a transposed `L` (the weight-side merge) need no copy.
- K3 gives each program one `(T split, block, K tile)` and walks its rows once, producing both
  `dx_j = g_j · R'_j^T` and the partial block gradient `G_j = x_j^T · g_j` from the same `g`
  tile. The whole output width of a block sits in one tile (`N <= 256`), so `g` is read exactly
  once. The reduction over T finishes inside the launch: each program writes its fp32 partial,
  waits at a barrier until all its threads have, then takes a ticket from its block's counter
  (an acquire-release atomic); the program that
  arrives last sums the block's partials in split order (a fixed order, so the result is
  bitwise reproducible run to run), writes `dR = G ⊙ S` and `dS = sum over K of G ⊙ R` in
  their storage dtypes, and resets the counter to zero for the next launch or graph replay.
  The split count is a function of the shape alone (`autotuning.split_rows`).

`UPCAST` casts loaded tiles to fp32. It is set under `TRITON_INTERPRET=1`, whose bf16 `tl.dot`
is broken (FURA_SPEC.md §7); on a GPU tiles go to the tensor cores in their own dtype and
accumulate in fp32. Row offsets are int64: `T * stride` passes 2^31 at real sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Where a kernel applies its per-block scale: nowhere, along w's rows (K) or its columns (N).
SCALE_NONE, SCALE_ROWS, SCALE_COLS = 0, 1, 2


@triton.jit
def block_diag_matmul_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
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
    stride_sb,
    stride_sv,
    stride_yt,
    stride_yb,
    stride_yn,
    t_bucket,  # autotune key only: T rounded to a bucket, so a new T does not re-tune
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """K1: `y[t, j, :] = x[t, j, :] @ (w[j] * s[j])` for every block `j`.

    x (T, nblk, K) any strides; w (nblk, K, N) any strides, any float dtype; s (nblk, K) with
    `SCALE == SCALE_ROWS` or (nblk, N) with `SCALE_COLS`, any float dtype, unused with
    `SCALE_NONE`; y (T, nblk, N) in x's dtype. The fold `w * s` is computed in fp32 and cast
    to x's dtype before the dot. Grid: (cdiv(T, BLOCK_T), nblk, cdiv(N, BLOCK_N)). Accumulates
    in fp32.
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
    if SCALE == 2:
        s_cols = tl.load(s_ptr + blk * stride_sb + offs_n * stride_sv, mask=mask_n, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE == 1:
            s_rows = tl.load(s_ptr + blk * stride_sb + kk * stride_sv, mask=mask_k, other=0.0).to(tl.float32)
            w = w.to(tl.float32) * s_rows[:, None]
        if SCALE == 2:
            w = w.to(tl.float32) * s_cols[None, :]
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    y_ptrs = y_ptr + blk * stride_yb + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


@triton.jit
def block_diag_backward_kernel(
    g_ptr,
    x_ptr,
    w_ptr,
    s_ptr,
    dx_ptr,
    dw_ptr,
    ds_ptr,
    partial_ptr,
    counter_ptr,
    T,
    K,
    N,
    rows_per_split,
    n_splits,
    stride_gt,
    stride_gb,
    stride_gn,
    stride_xt,
    stride_xb,
    stride_xk,
    stride_wb,
    stride_wk,
    stride_wn,
    stride_sb,
    stride_sn,
    stride_dxt,
    stride_dxb,
    stride_dxk,
    stride_dwb,
    stride_dwk,
    stride_dwn,
    stride_dsb,
    stride_dsn,
    stride_ps,
    stride_pb,
    stride_pk,
    t_bucket,  # autotune key only
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """K3, for every block `j`, with `w'[j] = w[j] * s[j]` (s scales columns; s = 1 without
    `HAS_SCALE`) and `G[j] = sum over t of x[t, j, :]^T g[t, j, :]` (fp32):

        dx[t, j, :] = g[t, j, :] @ w'[j]^T        in dx's dtype
        dw[j]       = G[j] * s[j]                 in dw's dtype (w's: the trainable dtype)
        ds[j, :]    = sum over K of G[j] * w[j]   in ds's dtype (needs HAS_SCALE)

    g (T, nblk, N); x (T, nblk, K) any strides; w (nblk, K, N) any float dtype; s (nblk, N);
    partial (n_splits, nblk, K, N) fp32 scratch; counter (nblk,) int32, zero on entry and on
    exit. Requires N <= BLOCK_N (one column tile holds a block's whole output width).
    Grid: (n_splits, nblk, cdiv(K, BLOCK_K)); split s covers rows [s, s+1) * rows_per_split.
    """
    pid_s = tl.program_id(0)
    blk = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    if HAS_SCALE:
        s_cols = tl.load(s_ptr + blk * stride_sb + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    if COMPUTE_DX:
        w = tl.load(
            w_ptr + blk * stride_wb + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            w = w.to(tl.float32) * s_cols[None, :]
        if UPCAST:
            w = w.to(tl.float32)
        else:
            w = w.to(g_ptr.dtype.element_ty)
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
        if COMPUTE_DW or COMPUTE_DS:
            x = tl.load(
                x_ptr + blk * stride_xb + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=mask_t[:, None] & mask_k[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
            gw_acc = tl.dot(tl.trans(x), g, gw_acc, input_precision=INPUT_PRECISION)
    if COMPUTE_DW or COMPUTE_DS:
        tile = offs_k[:, None] * stride_pk + offs_n[None, :]
        mask_kn = mask_k[:, None] & mask_n[None, :]
        tl.store(partial_ptr + pid_s.to(tl.int64) * stride_ps + blk * stride_pb + tile, gw_acc, mask=mask_kn)
        # Every thread's share of the partial is stored before the ticket is taken: the ticket's
        # release orders only the thread that takes it, so the others' stores need this barrier
        # (the memory model's cumulativity then carries them into the release).
        tl.debug_barrier()
        # Release this program's partial, acquire everyone else's: the last to arrive reduces.
        ticket = tl.atomic_add(counter_ptr + blk, 1, sem="acq_rel")
        if ticket == n_splits * tl.cdiv(K, BLOCK_K) - 1:
            ds_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                mask_kk = (kk < K)[:, None] & mask_n[None, :]
                tile_k = kk[:, None] * stride_pk + offs_n[None, :]
                total = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
                for split in range(0, n_splits):  # fixed order: reproducible bits
                    part = partial_ptr + split * stride_ps + blk * stride_pb + tile_k  # < 2^31: bounded partials
                    total += tl.load(part, mask=mask_kk, other=0.0, cache_modifier=".cg")
                if COMPUTE_DW:
                    dw = total * s_cols[None, :] if HAS_SCALE else total
                    dw_ptrs = dw_ptr + blk * stride_dwb + kk[:, None] * stride_dwk + offs_n[None, :] * stride_dwn
                    tl.store(dw_ptrs, dw.to(dw_ptr.dtype.element_ty), mask=mask_kk)
                if COMPUTE_DS:
                    w_tile = tl.load(
                        w_ptr + blk * stride_wb + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=mask_kk,
                        other=0.0,
                    ).to(tl.float32)
                    ds_acc += tl.sum(total * w_tile, axis=0)
            if COMPUTE_DS:
                tl.store(
                    ds_ptr + blk * stride_dsb + offs_n * stride_dsn, ds_acc.to(ds_ptr.dtype.element_ty), mask=mask_n
                )
            tl.atomic_xchg(counter_ptr + blk, 0)  # zero again for the next launch (or graph replay)


@triton.jit
def segmented_block_transform_kernel(
    x_ptr,
    maps_ptr,
    y_ptr,
    rows_ptr,
    group_offsets_ptr,
    group_slots_ptr,
    K,
    stride_xt,
    stride_xb,
    stride_xk,
    stride_ma,
    stride_mb,
    stride_mk,
    stride_mn,
    stride_yt,
    stride_yb,
    stride_yn,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Many adapters in one launch: `y[t, j, :] = x[t, j, :] @ maps[slot(t), j]`, or `x[t, j, :]`
    where a token has no map (the base model, or an adapter this layer does not carry).

    Tokens arrive grouped: `rows[group_offsets[g] : group_offsets[g + 1]]` are the rows of `x`
    that group `g` (one adapter of the batch) owns, and `group_slots[g]` is that adapter's map in
    `maps`, or -1 for none. x (T, nblk, K) any strides; maps (A, nblk, K, K) any strides, any
    float dtype, cast to x's dtype before the dot (as K1 does); y (T, nblk, K) in x's dtype;
    rows, group_offsets, group_slots int32. Grid: (groups, cdiv(largest group, BLOCK_T),
    nblk * cdiv(K, BLOCK_N)). A program owns one row tile of one group, one block and one column
    tile, so it reads one adapter's block tile only, and a group's tiles share it in L2. Programs
    past their group's end do nothing (the grid is sized by the largest group). Accumulates in
    fp32. Rows are gathered and scattered through `rows`, so the batch needs no reordering.
    """
    group = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_col_tiles = tl.cdiv(K, BLOCK_N)
    blk = (tl.program_id(2) // n_col_tiles).to(tl.int64)
    pid_n = tl.program_id(2) % n_col_tiles
    start = tl.load(group_offsets_ptr + group) + pid_t * BLOCK_T
    end = tl.load(group_offsets_ptr + group + 1)
    if start < end:
        slot = tl.load(group_slots_ptr + group).to(tl.int64)
        offs_t = start + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        rows = tl.load(rows_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < K
        x_rows = x_ptr + blk * stride_xb + rows[:, None] * stride_xt
        y_ptrs = y_ptr + blk * stride_yb + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
        mask_y = mask_t[:, None] & mask_n[None, :]
        if slot < 0:
            x = tl.load(x_rows + offs_n[None, :] * stride_xk, mask=mask_y, other=0.0)
            tl.store(y_ptrs, x, mask=mask_y)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            m_cols = maps_ptr + slot * stride_ma + blk * stride_mb + offs_n[None, :] * stride_mn
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < K
                x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
                m = tl.load(m_cols + kk[:, None] * stride_mk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                    m = m.to(tl.float32)
                else:
                    m = m.to(x_ptr.dtype.element_ty)
                acc = tl.dot(x, m, acc, input_precision=INPUT_PRECISION)
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
