"""Triton kernels that read NF4 (bitsandbytes layout, FURA_SPEC.md §5) directly.

Design note. QFuRA's frozen core is stored as `Lt` (N x K, N = out features, K = n*r), packed
4-bit with a scale per 64 consecutive values. Two regimes:

- Training (T > 64): one memory-bound pass dequantises `Lt` into a reusable scratch buffer
  (`nf4_dequantize_kernel`), and cuBLAS runs the big GEMMs on it. A dequantise-in-GEMM kernel
  cannot beat cuBLAS there on Hopper (bitsandbytes and torchao measured the same).
- Decode (T <= 64): the GEMM is bandwidth-bound on the 0.52 bytes/value of `Lt`, so the fused
  kernels dequantise tiles inside the K loop and never write `Lt` out. Operands are swapped so
  the dequantised tile (64-128 rows) is the MMA's large M side and the few tokens are its N
  side. K is split across programs for parallelism; the per-split partials are summed in a
  fixed order afterwards, so results are reproducible.

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
