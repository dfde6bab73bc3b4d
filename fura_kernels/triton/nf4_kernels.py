"""Triton kernels that read NF4 (bitsandbytes layout, FURA_SPEC.md §5) directly.

Design note. QFuRA's frozen core is stored as `Lt` (N x K, N = out features, K = n*r), packed
4-bit with a scale per 64 consecutive values. Two regimes:

- Training (T > 64): one memory-bound pass dequantises `Lt` into a reusable scratch buffer
  (`nf4_dequantize_kernel`), and cuBLAS runs the big GEMMs on it. A dequantise-in-GEMM kernel
  cannot beat cuBLAS there on Hopper (bitsandbytes and torchao measured the same).
- Small T (5..64): the GEMM is bandwidth-bound on the 0.52 bytes/value of `Lt`, so the fused
  kernels dequantise tiles inside the K loop and never write `Lt` out. Operands are swapped so
  the dequantised tile (64-128 rows) is the MMA's large M side and the few tokens are its N
  side. K is split across programs for parallelism; the per-split partials are summed in a
  fixed order afterwards, so results are reproducible.
- Decode (T <= 4): an MMA would pad the tokens to 16, so the decode kernels use CUDA-core FMAs
  instead. Packed codes are read 16 bytes at a time along a row, the 16 levels come from a
  where-tree of constants (no table in memory), and the reduction finishes inside the launch:
  over K within a program for `a · Lt^T`, over N across programs for `a · Lt` (the last
  program of each column tile sums the split partials in a fixed order, as K3 does).

Scales: `absmax[i]` (fp32) or, with double quantisation, `nested_code[q[i]] *
nested_absmax[i // 256] + offset`, where `i` is the 64-value block of the flattened tensor
(`offset` is read from device memory: passing it as a float would sync the host every launch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Round fp32 `x` to the frozen core's dtype ("bf16", "fp16" or "fp32"), kept in fp32.

    bf16 is rounded to nearest-even by integer arithmetic rather than a cast: it is what a GPU
    cast does, and the CPU interpreter's cast truncates instead (FURA_SPEC.md §7), so the same
    code gives the same bits on both.
    """
    if DTYPE == "bf16":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == "fp16":
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _nf4_level(code):
    """The NF4 level of 4-bit codes (int32), by a where-tree of the 16 constants of
    `fura_kernels.nf4.NF4_LEVELS`: the table lives in the instruction stream, not in memory, so
    decoding a value needs no load (bitsandbytes' kernels do the same)."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    b3 = (code & 8) != 0
    q0 = tl.where(b0, -0.6961928009986877, -1.0)
    q1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    q2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    q3 = tl.where(b0, 0.0, -0.09105003625154495)
    q4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    q5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    q6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    q7 = tl.where(b0, 1.0, 0.7229568362236023)
    h0 = tl.where(b1, q1, q0)
    h1 = tl.where(b1, q3, q2)
    h2 = tl.where(b1, q5, q4)
    h3 = tl.where(b1, q7, q6)
    return tl.where(b3, tl.where(b2, h3, h2), tl.where(b2, h1, h0))


@triton.jit
def _nf4_pair_levels(packed_ptr, levels_ptr, byte_index, mask):
    """fp32 levels of both values in each packed byte: the high nibble holds the even-indexed
    value (bitsandbytes' layout). One byte load serves two values."""
    byte = tl.load(packed_ptr + byte_index, mask=mask, other=0).to(tl.int32)
    even = tl.load(levels_ptr + (byte >> 4), mask=mask, other=0.0)
    odd = tl.load(levels_ptr + (byte & 0xF), mask=mask, other=0.0)
    return even, odd


@triton.jit
def _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 scales of the 64-value blocks `block` (int64 indices), one load per block rather
    than one per value."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        return tl.load(nested_code_ptr + q, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + block // 256, mask=mask, other=0.0
        ) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _spread(scale, ROWS: tl.constexpr, GROUPS: tl.constexpr):
    """(ROWS, GROUPS) block scales -> (ROWS, GROUPS * 32): one per packed byte of the tile."""
    return tl.reshape(tl.broadcast_to(scale[:, :, None], (ROWS, GROUPS, 32)), (ROWS, GROUPS * 32))


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr,
    absmax_ptr,
    levels_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    out_ptr,
    numel,
    n_bytes,
    GROUPS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """`out.flatten()[i] = level[code[i]] * scale[i // 64]` (fp32 math, rounded to nearest in
    out's dtype, named by OUT_DTYPE: "bf16", "fp16" or "fp32").

    Grid: (cdiv(numel, 64 * GROUPS),). Each program takes GROUPS whole scale blocks as a
    (GROUPS, 32) tile of bytes: contiguous byte loads, one scale load per block, and the two
    values of a byte written side by side (`tl.join`), so stores stay contiguous. Any numel.
    """
    pid = tl.program_id(0).to(tl.int64)
    block = pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    # Indices written as base + arange, never through a division, so the compiler can prove
    # them contiguous and issue vector loads and stores.
    byte_index = block[:, None] * 32 + tl.arange(0, 32)[None, :]
    # n_bytes = ceil(numel / 2) as its own argument: its divisibility (a launch specialises on
    # it) lets the compiler prove the mask uniform over a vector of bytes.
    even, odd = _nf4_pair_levels(packed_ptr, levels_ptr, byte_index, byte_index < n_bytes)
    scale = _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, block, block * 64 < numel,
                          DOUBLE_QUANT)[:, None]  # fmt: skip
    values = tl.join(_round_to(even * scale, OUT_DTYPE), _round_to(odd * scale, OUT_DTYPE))
    values = tl.reshape(values, (GROUPS * 64,))  # (GROUPS, 32, 2) row-major: value order
    index = pid * GROUPS * 64 + tl.arange(0, GROUPS * 64)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < numel)


@triton.jit
def nf4_matmul_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    levels_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    partial_ptr,
    T,
    N,
    K,
    k_per_split,
    stride_at,
    stride_ak,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    L_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Split-K partials of `y = a @ Lt^T`: `partial[s, n, t] = sum over k in split s of
    Lt[n, k] * a[t, k]`, fp32. a (T, K) any strides, T <= BLOCK_T; Lt (N, K) NF4 with
    K % 64 == 0, its values rounded to L_DTYPE (the dtype it was quantised from) before use.
    BLOCK_K and k_per_split are multiples of 64.

    Grid: (cdiv(N, BLOCK_N), n_splits). Each K tile is read as packed bytes, so the even- and
    odd-indexed columns come out as two (BLOCK_N, BLOCK_K / 2) halves: two dots against the
    matching columns of `a` add up to the tile's product with no interleaving. The dequantised
    tile is the dots' M operand; the few tokens are N.
    """
    GROUPS: tl.constexpr = BLOCK_K // 64
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_n = offs_n < N
    mask_t = offs_t < T
    row_bytes = offs_n.to(tl.int64) * (K // 2)
    row_blocks = offs_n.to(tl.int64) * (K // 64)
    pairs = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, GROUPS)
    a_rows = a_ptr + offs_t[:, None].to(tl.int64) * stride_at
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        even_k = k0 + 2 * pairs
        mask_k = even_k < k_end  # k_end is a multiple of 64: whole blocks, whole pairs
        tile_mask = mask_n[:, None] & mask_k[None, :]
        even, odd = _nf4_pair_levels(packed_ptr, levels_ptr, row_bytes[:, None] + (k0 // 2 + pairs)[None, :], tile_mask)
        scale = _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                              row_blocks[:, None] + (k0 // 64 + groups)[None, :],
                              mask_n[:, None] & (k0 + 64 * groups < k_end)[None, :], DOUBLE_QUANT)  # fmt: skip
        scale = _spread(scale, BLOCK_N, GROUPS)
        # The core's values are its dtype's, as `dequantize_nf4` gives them.
        lt_even = _round_to(even * scale, L_DTYPE)
        lt_odd = _round_to(odd * scale, L_DTYPE)
        a_mask = mask_t[:, None] & mask_k[None, :]
        a_even = tl.load(a_rows + even_k[None, :] * stride_ak, mask=a_mask, other=0.0)
        a_odd = tl.load(a_rows + (even_k + 1)[None, :] * stride_ak, mask=a_mask, other=0.0)
        if UPCAST:
            a_even = a_even.to(tl.float32)
            a_odd = a_odd.to(tl.float32)
        else:
            lt_even = lt_even.to(a_even.dtype)
            lt_odd = lt_odd.to(a_even.dtype)
        acc = tl.dot(lt_even, tl.trans(a_even), acc)
        acc = tl.dot(lt_odd, tl.trans(a_odd), acc)
    out = partial_ptr + pid_s.to(tl.int64) * N * BLOCK_T + offs_n[:, None].to(tl.int64) * BLOCK_T + offs_t[None, :]
    tl.store(out, acc, mask=mask_n[:, None] & mask_t[None, :])


@triton.jit
def nf4_matmul_t_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    levels_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    partial_ptr,
    T,
    N,
    K,
    n_per_split,
    stride_at,
    stride_an,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    L_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Split-N partials of `g = a @ Lt`: `partial[s, k, t] = sum over n in split s of
    Lt[n, k] * a[t, n]`, fp32. a (T, N) any strides, T <= BLOCK_T; Lt (N, K) NF4 with
    K % 64 == 0; BLOCK_K a multiple of 64, n_per_split of BLOCK_N.

    Grid: (cdiv(K, BLOCK_K), n_splits). As in `nf4_matmul_kernel` the tile comes out as its
    even and odd columns; here they are output rows, accumulated apart and stored interleaved.
    The dequantised tile, transposed, is the dots' M operand.
    """
    GROUPS: tl.constexpr = BLOCK_K // 64
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    even_k = pid_k * BLOCK_K + 2 * tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, GROUPS)
    offs_t = tl.arange(0, BLOCK_T)
    mask_k = even_k < K
    mask_t = offs_t < T
    acc_even = tl.zeros((BLOCK_K // 2, BLOCK_T), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_K // 2, BLOCK_T), dtype=tl.float32)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        rows = offs_n.to(tl.int64)
        even, odd = _nf4_pair_levels(packed_ptr, levels_ptr, rows[:, None] * (K // 2) + (even_k // 2)[None, :],
                                     mask_n[:, None] & mask_k[None, :])  # fmt: skip
        scale = _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                              rows[:, None] * (K // 64) + (pid_k * GROUPS + groups)[None, :],
                              mask_n[:, None] & (pid_k * BLOCK_K + 64 * groups < K)[None, :], DOUBLE_QUANT)  # fmt: skip
        scale = _spread(scale, BLOCK_N, GROUPS)
        lt_even = _round_to(even * scale, L_DTYPE)
        lt_odd = _round_to(odd * scale, L_DTYPE)
        a = tl.load(
            a_ptr + offs_t[:, None].to(tl.int64) * stride_at + offs_n[None, :] * stride_an,
            mask=mask_t[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
        else:
            lt_even = lt_even.to(a.dtype)
            lt_odd = lt_odd.to(a.dtype)
        acc_even = tl.dot(tl.trans(lt_even), tl.trans(a), acc_even)
        acc_odd = tl.dot(tl.trans(lt_odd), tl.trans(a), acc_odd)
    out = partial_ptr + pid_s.to(tl.int64) * K * BLOCK_T + even_k[:, None].to(tl.int64) * BLOCK_T + offs_t[None, :]
    out_mask = mask_k[:, None] & mask_t[None, :]
    tl.store(out, acc_even, mask=out_mask)
    tl.store(out + BLOCK_T, acc_odd, mask=out_mask)


@triton.jit
def _decode_tile(packed_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, rows, mask_rows, first_block,
                 K, row_bytes, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 L_DTYPE: tl.constexpr):  # fmt: skip
    """The tile `Lt[rows, 64 * first_block : 64 * first_block + BLOCK_K]` as its even and odd
    columns, (BLOCK_N, BLOCK_K / 2) fp32 each, rounded to L_DTYPE: the packed bytes of each row
    are contiguous (vector loads), one scale per 64-value block, levels from `_nf4_level`."""
    GROUPS: tl.constexpr = BLOCK_K // 64
    byte_col = first_block * 32 + tl.arange(0, BLOCK_K // 2)
    tile_mask = mask_rows[:, None] & (byte_col < row_bytes)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * row_bytes + byte_col[None, :], mask=tile_mask, other=0).to(tl.int32)
    blocks = first_block + tl.arange(0, GROUPS)
    scale = _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                          rows[:, None] * (K // 64) + blocks[None, :], mask_rows[:, None] & (blocks * 64 < K)[None, :],
                          DOUBLE_QUANT)  # fmt: skip
    scale = _spread(scale, BLOCK_N, GROUPS)
    return _round_to(_nf4_level(byte >> 4) * scale, L_DTYPE), _round_to(_nf4_level(byte & 0xF) * scale, L_DTYPE)


@triton.jit
def nf4_decode_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    y_ptr,
    T,
    N,
    K,
    row_bytes,
    stride_at,
    stride_ak,
    stride_yt,
    stride_yn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    L_DTYPE: tl.constexpr,
):
    """Decode `y = a @ Lt^T` for T <= BLOCK_T (a few tokens): y[t, n] = sum_k Lt[n, k] a[t, k],
    in y's dtype. a (T, K) any strides; Lt (N, K) NF4, K % 64 == 0, `row_bytes = K // 2` (its
    own argument, so a launch can specialise on its divisibility and load 16 bytes at a time).

    Grid: (cdiv(N, BLOCK_N),). Each program owns BLOCK_N rows and walks K in tiles of BLOCK_K
    values (BLOCK_K / 2 contiguous bytes a row): the bytes' high and low nibbles are the even and
    odd columns, multiplied with the matching columns of `a` on CUDA cores (no MMA, so nothing
    is padded to 16 tokens) and reduced over K inside the program: no partials, no second pass.
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_n = offs_n < N
    mask_t = offs_t < T
    rows = offs_n.to(tl.int64)
    a_rows = a_ptr + offs_t[:, None].to(tl.int64) * stride_at
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        lt_even, lt_odd = _decode_tile(packed_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, rows,
                                       mask_n, k0 // 64, K, row_bytes, BLOCK_N, BLOCK_K, DOUBLE_QUANT,
                                       L_DTYPE)  # fmt: skip
        # The activation tile is read contiguously (vector loads) and split into its even and
        # odd columns in registers, to meet the two nibbles of each byte.
        cols = k0 + tl.arange(0, BLOCK_K)
        a_tile = tl.load(a_rows + cols[None, :] * stride_ak, mask=mask_t[:, None] & (cols < K)[None, :], other=0.0)
        a_even, a_odd = tl.split(tl.reshape(a_tile.to(tl.float32), (BLOCK_T, BLOCK_K // 2, 2)))
        prod = lt_even[:, None, :] * a_even[None, :, :] + lt_odd[:, None, :] * a_odd[None, :, :]
        acc += tl.sum(prod, axis=2)
    y_ptrs = y_ptr + offs_t[None, :].to(tl.int64) * stride_yt + rows[:, None] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_t[None, :])


@triton.jit
def nf4_decode_t_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    partial_ptr,
    counter_ptr,
    out_ptr,
    T,
    N,
    K,
    row_bytes,
    n_per_split,
    n_splits,
    stride_at,
    stride_an,
    stride_ot,
    stride_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    L_DTYPE: tl.constexpr,
):
    """Decode `g = a @ Lt` for T <= BLOCK_T: g[t, k] = sum_n a[t, n] Lt[n, k], in out's dtype.
    a (T, N) any strides; Lt (N, K) NF4 as in `nf4_decode_kernel`; partial (n_splits, BLOCK_T,
    K) fp32 scratch; counter (cdiv(K, BLOCK_K),) int32, zero on entry and on exit.

    Grid: (cdiv(K, BLOCK_K), n_splits). A program reduces its split's rows for one tile of
    columns on CUDA cores; the last program of a column tile to arrive (an acquire-release
    ticket) adds the splits' partials in order and writes the output: one launch, reproducible.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    byte_col = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask_b = byte_col < row_bytes
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    acc_even = tl.zeros((BLOCK_T, BLOCK_K // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_T, BLOCK_K // 2), dtype=tl.float32)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        rows = offs_n.to(tl.int64)
        lt_even, lt_odd = _decode_tile(packed_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, rows,
                                       mask_n, pid_k * (BLOCK_K // 64), K, row_bytes, BLOCK_N, BLOCK_K, DOUBLE_QUANT,
                                       L_DTYPE)  # fmt: skip
        a = tl.load(a_ptr + offs_t[:, None].to(tl.int64) * stride_at + offs_n[None, :] * stride_an,
                    mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # fmt: skip
        acc_even += tl.sum(a[:, :, None] * lt_even[None, :, :], axis=1)
        acc_odd += tl.sum(a[:, :, None] * lt_odd[None, :, :], axis=1)
    out_mask = mask_t[:, None] & mask_b[None, :]
    cols = 2 * byte_col.to(tl.int64)
    if n_splits == 1:
        out_even = out_ptr + offs_t[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_ok
        tl.store(out_even, acc_even.to(out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(out_even + stride_ok, acc_odd.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = offs_t[:, None] * K + cols[None, :]
        split_stride = BLOCK_T * K
        tl.store(partial_ptr + pid_s * split_stride + tile, acc_even, mask=out_mask)
        tl.store(partial_ptr + pid_s * split_stride + tile + 1, acc_odd, mask=out_mask)
        tl.debug_barrier()  # all threads' partials stored before the ticket's release (as in K3)
        ticket = tl.atomic_add(counter_ptr + pid_k, 1, sem="acq_rel")
        if ticket == n_splits - 1:
            total_even = tl.zeros((BLOCK_T, BLOCK_K // 2), dtype=tl.float32)
            total_odd = tl.zeros((BLOCK_T, BLOCK_K // 2), dtype=tl.float32)
            for split in range(0, n_splits):  # fixed order: reproducible bits
                total_even += tl.load(partial_ptr + split * split_stride + tile, mask=out_mask, other=0.0,
                                      cache_modifier=".cg")  # fmt: skip
                total_odd += tl.load(partial_ptr + split * split_stride + tile + 1, mask=out_mask, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
            out_even = out_ptr + offs_t[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_ok
            tl.store(out_even, total_even.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(out_even + stride_ok, total_odd.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_k, 0)  # zero again for the next launch (or graph replay)
