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
def _nf4_values(packed_ptr, absmax_ptr, levels_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, flat, mask,
                DOUBLE_QUANT: tl.constexpr):  # fmt: skip
    """fp32 values of the flattened NF4 elements `flat` (int64 indices)."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    level = tl.load(levels_ptr + nibble, mask=mask, other=0.0)
    block = flat // 64
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + block // 256, mask=mask, other=0.0
        ) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return level * scale


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
    BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """`out.flatten()[i] = level[code[i]] * scale[i // 64]` (fp32 math, rounded to nearest in
    out's dtype, named by OUT_DTYPE: "bf16", "fp16" or "fp32").

    Grid: (cdiv(numel, BLOCK),). Works for any numel; out is contiguous.
    """
    pid = tl.program_id(0).to(tl.int64)
    flat = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = flat < numel
    values = _nf4_values(packed_ptr, absmax_ptr, levels_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, flat, mask,
                         DOUBLE_QUANT)  # fmt: skip
    tl.store(out_ptr + flat, _round_to(values, OUT_DTYPE).to(out_ptr.dtype.element_ty), mask=mask)


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
    Lt[n, k] * a[t, k]`, fp32. a (T, K) any strides, T <= BLOCK_T; Lt (N, K) NF4, its values
    rounded to L_DTYPE (the dtype it was quantised from) before use.

    Grid: (cdiv(N, BLOCK_N), n_splits). The dequantised Lt tile is the dot's M operand.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_n = offs_n < N
    mask_t = offs_t < T
    rows = offs_n.to(tl.int64) * K
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        tile_mask = mask_n[:, None] & mask_k[None, :]
        lt = _nf4_values(packed_ptr, absmax_ptr, levels_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                         rows[:, None] + offs_k[None, :], tile_mask, DOUBLE_QUANT)  # fmt: skip
        lt = _round_to(lt, L_DTYPE)  # the core's values are its dtype's, as `dequantize_nf4` gives
        a = tl.load(
            a_ptr + offs_t[:, None].to(tl.int64) * stride_at + offs_k[None, :] * stride_ak,
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
        else:
            lt = lt.to(a.dtype)
        acc = tl.dot(lt, tl.trans(a), acc)
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
    Lt[n, k] * a[t, n]`, fp32. a (T, N) any strides, T <= BLOCK_T; Lt (N, K) NF4.

    Grid: (cdiv(K, BLOCK_K), n_splits). The dequantised tile, transposed, is the M operand.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    mask_k = offs_k < K
    mask_t = offs_t < T
    acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        flat = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        lt = _nf4_values(packed_ptr, absmax_ptr, levels_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                         flat, mask_n[:, None] & mask_k[None, :], DOUBLE_QUANT)  # fmt: skip
        lt = _round_to(lt, L_DTYPE)
        a = tl.load(
            a_ptr + offs_t[:, None].to(tl.int64) * stride_at + offs_n[None, :] * stride_an,
            mask=mask_t[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
        else:
            lt = lt.to(a.dtype)
        acc = tl.dot(tl.trans(lt), tl.trans(a), acc)
    out = partial_ptr + pid_s.to(tl.int64) * K * BLOCK_T + offs_k[:, None].to(tl.int64) * BLOCK_T + offs_t[None, :]
    tl.store(out, acc, mask=mask_k[:, None] & mask_t[None, :])
