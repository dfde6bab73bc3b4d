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
- Decode (T <= 4): an MMA would pad the tokens to 16, so the decode kernels use CUDA-core FMAs,
  and everything else is made cheap enough that the loop issues a few instructions per weight
  (it must, to keep up with 0.5 bytes per weight). Per 64-value scale block of a row, the 16
  values `round(level[c] * scale)` the block can take are computed once and kept in 8 registers
  as byte planes; a 32-bit word of codes (8 weights) is then decoded with byte permutes
  (`_decode_word`), no compare tree and no per-weight multiply or rounding. Products accumulate
  per thread across the whole reduction; threads are summed once, after the loop. The token
  count is a constexpr (1, 2 or 4), so T = 1 computes one product per weight, not four.

Scales: `absmax[i]` (fp32) or, with double quantisation, `nested_code[q[i]] *
nested_absmax[i // 256] + offset`, where `i` is the 64-value block of the flattened tensor
(`offset` is read from device memory: passing it as a float would sync the host every launch).
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from ..nf4 import NF4_LEVELS
from .autotuning import INTERPRET

# Triton's CPU interpreter runs no PTX (`inline_asm_elementwise`) and its fp32 -> bf16 cast
# truncates (FURA_SPEC.md §7): there, the kernels take the portable path, which gives the same
# bits.
_INTERPRETING = tl.constexpr(INTERPRET)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Round fp32 `x` to the frozen core's dtype ("bf16", "fp16" or "fp32"), kept in fp32.

    On a GPU the cast rounds to nearest-even in hardware. The CPU interpreter's bf16 cast
    truncates instead (FURA_SPEC.md §7), so there bf16 is rounded by integer arithmetic, to the
    same bits.
    """
    if DTYPE == "bf16":
        if not _INTERPRETING:
            return x.to(tl.bfloat16).to(tl.float32)
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
    than one per value. With double quantisation, `code * absmax2 + offset` rounds after the
    product and after the sum, as bitsandbytes computes it: never one fused multiply-add."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        code = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        absmax2 = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        offset = tl.load(offset_ptr)
        if _INTERPRETING:  # numpy rounds each operation
            return code * absmax2 + offset
        # `.rn` arithmetic is never contracted into an FMA, whatever the kernel's fp-fusion setting.
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.rn.f32 t, $1, $2; add.rn.f32 $0, t, $3; }", "=f,f,f,f",
            [code, absmax2, offset + tl.zeros_like(code)], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
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


# --- decode (T <= 4): byte-permute decoding ----------------------------------------------------
#
# A 64-value scale block of a row can hold only 16 distinct values, `round(level[c] * scale)`.
# `_byte_planes` computes them once per block (16 multiplies, 8 paired roundings, the hardware's)
# and keeps them as byte planes: the high bytes of the 16 bf16/fp16 values, four to a register
# (levels 0-3, 4-7, 8-11, 12-15), and their low bytes likewise. `_decode_word` then decodes a
# 32-bit word of codes (8 weights) with `prmt`, whose selector takes four 3-bit byte indices:
# one permute looks up four codes' high bytes among levels 0-7, one among levels 8-15, a third
# keeps per code the one its top bit asks for; the same for the low bytes; two more pair high
# and low bytes into two values each, and a shift or a mask (bf16) or a conversion (fp16) makes
# each fp32 weight. About 4 instructions a weight, against a 15-select compare tree, an integer
# rounding and a multiply before. PTX, so GPU only; under the interpreter, and for fp32 cores
# (no 16-bit values to look up), the same weights come from the level table and `_round_to`.


def _f32_literal(value: float) -> str:
    return f"0f{struct.unpack('<I', struct.pack('<f', value))[0]:08X}"


def _byte_planes_ptx(convert: str) -> str:
    """`$8`, a block's fp32 scale -> `$0..$3`, the high bytes of the 16 rounded values
    `level[c] * scale` (c = 4m .. 4m + 3 in `$m`, byte i holding c = 4m + i), `$4..$7` their low
    bytes. `convert` is the paired fp32 -> 16-bit rounding, nearest-even."""
    lines = ["{", ".reg .f32 p<16>;", ".reg .b32 q<8>;"]
    lines += [f"mul.rn.f32 p{c}, $8, {_f32_literal(level)};" for c, level in enumerate(NF4_LEVELS)]
    # q_i holds values 2i (low half) and 2i + 1: bytes [lo(2i), hi(2i), lo(2i+1), hi(2i+1)].
    lines += [f"{convert} q{i}, p{2 * i + 1}, p{2 * i};" for i in range(8)]
    for m in range(4):
        lines.append(f"prmt.b32 ${m}, q{2 * m}, q{2 * m + 1}, 0x7531;")
        lines.append(f"prmt.b32 ${4 + m}, q{2 * m}, q{2 * m + 1}, 0x6420;")
    return "\n".join(lines + ["}"])


def _decode_word_ptx(dtype: str) -> str:
    """`$8`, a word of 8 codes, and `$9..$16`, a block's byte planes -> `$0..$7`, the fp32 bits
    of its weights in order (weight 2i is byte i's high nibble, 2i + 1 its low nibble)."""

    def widen(pair: str, low: int, high: int) -> list[str]:
        if dtype == "bf16":  # a bf16 is the top half of its fp32
            return [f"shl.b32 ${low}, {pair}, 16;", f"and.b32 ${high}, {pair}, 0xffff0000;"]
        return [f"mov.b32 {{e, f}}, {pair};", f"cvt.f32.f16 ${low}, e;", f"cvt.f32.f16 ${high}, f;"]

    def four(codes: str, first: int) -> list[str]:
        # The low 16 bits of `codes` hold four codes: nibble i is weight first + (i ^ 1).
        return [
            f"and.b32 s, {codes}, 0x7777;",  # byte index within levels 0-7 / 8-15
            f"shr.b32 t, {codes}, 1;",
            "and.b32 t, t, 0x4444;",
            "or.b32 t, t, 0x3210;",  # output byte i from the 8-15 lookup when the code's bit 3 is set
            "prmt.b32 a, $9, $10, s;",
            "prmt.b32 b, $11, $12, s;",
            "prmt.b32 h, a, b, t;",  # high bytes of the four values
            "prmt.b32 a, $13, $14, s;",
            "prmt.b32 b, $15, $16, s;",
            "prmt.b32 l, a, b, t;",  # low bytes
            "prmt.b32 x, l, h, 0x5140;",  # nibbles 0, 1 as a 16-bit pair
            *widen("x", first + 1, first),
            "prmt.b32 x, l, h, 0x7362;",  # nibbles 2, 3
            *widen("x", first + 3, first + 2),
        ]

    registers = ".reg .b32 s, t, a, b, h, l, x, u;" + ("" if dtype == "bf16" else " .reg .b16 e, f;")
    return "\n".join(["{", registers, *four("$8", 0), "shr.b32 u, $8, 16;", *four("u", 4), "}"])


_PLANES_BF16 = tl.constexpr(_byte_planes_ptx("cvt.rn.bf16x2.f32"))
_PLANES_FP16 = tl.constexpr(_byte_planes_ptx("cvt.rn.f16x2.f32"))
_DECODE_BF16 = tl.constexpr(_decode_word_ptx("bf16"))
_DECODE_FP16 = tl.constexpr(_decode_word_ptx("fp16"))
_EIGHT_OUT = tl.constexpr("=r," * 8)


@triton.jit
def _byte_planes(scale, L_DTYPE: tl.constexpr):
    """The 8 byte-plane registers of the blocks whose fp32 scales are `scale` (any shape)."""
    asm: tl.constexpr = _PLANES_BF16 if L_DTYPE == "bf16" else _PLANES_FP16
    return tl.inline_asm_elementwise(asm, _EIGHT_OUT + "f", [scale], dtype=(tl.uint32,) * 8, is_pure=True, pack=1)


@triton.jit
def _decode_word(word, scale, planes, levels_ptr, L_DTYPE: tl.constexpr, PERMUTE: tl.constexpr):
    """The 8 weights of each uint32 `word` of codes (the bytes of 8 consecutive values), fp32 and
    rounded to L_DTYPE, as a tuple in value order; `scale` is the word's block scale (same shape).
    PERMUTE: by byte permutes from the block's `planes` (GPU, 16-bit cores); otherwise from the
    level table in memory (`levels_ptr`, 16 fp32, cached) and `_round_to` (interpreter, fp32
    cores): the same values."""
    if PERMUTE:
        asm: tl.constexpr = _DECODE_BF16 if L_DTYPE == "bf16" else _DECODE_FP16
        bits = tl.inline_asm_elementwise(asm, _EIGHT_OUT + "r," * 8 + "r", [word, planes[0], planes[1], planes[2],
                                         planes[3], planes[4], planes[5], planes[6], planes[7]], dtype=(tl.uint32,) * 8,
                                         is_pure=True, pack=1)  # fmt: skip
        return (bits[0].to(tl.float32, bitcast=True), bits[1].to(tl.float32, bitcast=True),
                bits[2].to(tl.float32, bitcast=True), bits[3].to(tl.float32, bitcast=True),
                bits[4].to(tl.float32, bitcast=True), bits[5].to(tl.float32, bitcast=True),
                bits[6].to(tl.float32, bitcast=True), bits[7].to(tl.float32, bitcast=True))  # fmt: skip
    codes = word.to(tl.int32, bitcast=True)
    return (_round_to(tl.load(levels_ptr + ((codes >> 4) & 0xF)) * scale, L_DTYPE),
            _round_to(tl.load(levels_ptr + (codes & 0xF)) * scale, L_DTYPE),
            _round_to(tl.load(levels_ptr + ((codes >> 12) & 0xF)) * scale, L_DTYPE),
            _round_to(tl.load(levels_ptr + ((codes >> 8) & 0xF)) * scale, L_DTYPE),
            _round_to(tl.load(levels_ptr + ((codes >> 20) & 0xF)) * scale, L_DTYPE),
            _round_to(tl.load(levels_ptr + ((codes >> 16) & 0xF)) * scale, L_DTYPE),
            _round_to(tl.load(levels_ptr + ((codes >> 28) & 0xF)) * scale, L_DTYPE),
            _round_to(tl.load(levels_ptr + ((codes >> 24) & 0xF)) * scale, L_DTYPE))  # fmt: skip


@triton.jit
def _columns4(x):
    """(M, 4) -> its four columns in order, (M,) each: register splits, no data movement."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _stack4(x0, x1, x2, x3):
    """Four (M,) tensors -> (M, 4), in order. A join puts its new axis in each thread's
    registers on every Triton version, so the result's layout is S's, whatever the coalescer
    would have chosen for a 2-D load."""
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (x0.shape[0], 4))


@triton.jit
def _stack8(v):
    """A tuple of 8 (M,) tensors -> (M, 8), in order."""
    even = tl.join(tl.join(v[0], v[4]), tl.join(v[2], v[6]))
    odd = tl.join(tl.join(v[1], v[5]), tl.join(v[3], v[7]))
    return tl.reshape(tl.join(even, odd), (v[0].shape[0], 8))


@triton.jit
def _activations8(a_ptr, k, stride_ak, mask, A_VEC: tl.constexpr):
    """`a[k + j]` for j = 0..7 (k: (G,) column indices) as 8 tensors of k's shape: A_VEC (8 or 4)
    contiguous values a load (16 bytes) when a's last stride is 1, one at a time otherwise."""
    if A_VEC == 8:
        return _columns8(tl.load(a_ptr + k[:, None] + tl.arange(0, 8)[None, :], mask=mask[:, None], other=0.0))
    elif A_VEC == 4:
        quads = tl.arange(0, 4)[None, :]
        a0, a1, a2, a3 = _columns4(tl.load(a_ptr + k[:, None] + quads, mask=mask[:, None], other=0.0))
        a4, a5, a6, a7 = _columns4(tl.load(a_ptr + (k + 4)[:, None] + quads, mask=mask[:, None], other=0.0))
        return a0, a1, a2, a3, a4, a5, a6, a7
    else:
        columns = a_ptr + k.to(tl.int64) * stride_ak
        a0 = tl.load(columns, mask=mask, other=0.0)
        a1 = tl.load(columns + stride_ak, mask=mask, other=0.0)
        a2 = tl.load(columns + 2 * stride_ak, mask=mask, other=0.0)
        a3 = tl.load(columns + 3 * stride_ak, mask=mask, other=0.0)
        a4 = tl.load(columns + 4 * stride_ak, mask=mask, other=0.0)
        a5 = tl.load(columns + 5 * stride_ak, mask=mask, other=0.0)
        a6 = tl.load(columns + 6 * stride_ak, mask=mask, other=0.0)
        a7 = tl.load(columns + 7 * stride_ak, mask=mask, other=0.0)
        return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _columns8(x):
    """(M, 8) -> its eight columns in order."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 4, 2)))
    e0, e1, e2, e3 = _columns4(even)
    o0, o1, o2, o3 = _columns4(odd)
    return e0, o0, e1, o1, e2, o2, e3, o3


@triton.jit
def _accumulate(acc, weights, a_ptr, k, stride_ak, mask, A_VEC: tl.constexpr):
    """acc (G, 4 rows) += the 8 weights of one word of each row times one token's activations
    at the word's 8 columns `k .. k + 7` (k: (G,) element offsets)."""
    a = _activations8(a_ptr, k, stride_ak, mask, A_VEC)
    for j in tl.static_range(8):
        acc += weights[j] * a[j].to(tl.float32)[:, None]
    return acc


@triton.jit
def nf4_decode_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    levels_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    y_ptr,
    T,
    N,
    blocks_per_row,
    stride_at,
    stride_ak,
    stride_yt,
    stride_yn,
    GROUPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    EVEN_K: tl.constexpr,
    A_VEC: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    L_DTYPE: tl.constexpr,
    PERMUTE: tl.constexpr,
):
    """Decode `y = a @ Lt^T` for T <= BLOCK_T (1, 2 or 4): y[t, n] = sum_k Lt[n, k] a[t, k], in
    y's dtype. a (T, K) any strides; Lt (N, K) NF4 with K = 64 * blocks_per_row, its packed bytes
    4-byte aligned (read as uint32 words), values rounded to L_DTYPE as `dequantize_nf4` gives them.

    Grid: (cdiv(N, 4),). A program owns 4 rows and walks K in steps of GROUPS scale blocks, one
    block a thread (GROUPS = 32 * num_warps): 2 x 16-byte loads of codes per row, the block's
    byte planes once per row, then 8 words x 8 weights, each multiplied with the matching
    activations, which the thread reads once for its 4 rows. Each thread keeps its products
    (per row and token) in registers for the whole of K; threads are summed once at the end. No
    partials, no second pass. EVEN_K: blocks_per_row is a multiple of GROUPS (no tail). Rows past
    N re-read row N - 1, and tail blocks re-read the last block with zero activations and a zero
    scale, so the loads of codes need no mask.
    """
    row0 = tl.program_id(0) * 4
    r0 = tl.minimum(row0, N - 1).to(tl.int64)
    r1 = tl.minimum(row0 + 1, N - 1).to(tl.int64)
    r2 = tl.minimum(row0 + 2, N - 1).to(tl.int64)
    r3 = tl.minimum(row0 + 3, N - 1).to(tl.int64)
    row_words = blocks_per_row * 8
    words = packed_ptr.to(tl.pointer_type(tl.uint32))
    groups = tl.arange(0, GROUPS)
    quads = tl.arange(0, 4)
    acc0 = tl.zeros((GROUPS, 4), dtype=tl.float32)
    acc1 = tl.zeros((GROUPS, 4), dtype=tl.float32)
    acc2 = tl.zeros((GROUPS, 4), dtype=tl.float32)
    acc3 = tl.zeros((GROUPS, 4), dtype=tl.float32)
    tokens = groups * 0 + T  # T as a tensor, for masks (the interpreter takes no scalar in a mask)
    for g0 in range(0, blocks_per_row, GROUPS):
        blocks = g0 + groups
        in_k = blocks < blocks_per_row
        if not EVEN_K:
            blocks = tl.minimum(blocks, blocks_per_row - 1)
        scale = _stack4(
            _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, r0 * blocks_per_row + blocks,
                          in_k, DOUBLE_QUANT),
            _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, r1 * blocks_per_row + blocks,
                          in_k, DOUBLE_QUANT),
            _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, r2 * blocks_per_row + blocks,
                          in_k, DOUBLE_QUANT),
            _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, r3 * blocks_per_row + blocks,
                          in_k, DOUBLE_QUANT),
        )  # fmt: skip
        if PERMUTE:
            planes = _byte_planes(scale, L_DTYPE)
        else:
            planes = scale  # unused
        for half in tl.static_range(2):
            cols = (blocks * 8 + 4 * half)[:, None] + quads[None, :]
            w0 = _columns4(tl.load(words + r0 * row_words + cols))
            w1 = _columns4(tl.load(words + r1 * row_words + cols))
            w2 = _columns4(tl.load(words + r2 * row_words + cols))
            w3 = _columns4(tl.load(words + r3 * row_words + cols))
            for q in tl.static_range(4):
                weights = _decode_word(_stack4(w0[q], w1[q], w2[q], w3[q]), scale, planes, levels_ptr, L_DTYPE, PERMUTE)
                k = blocks * 64 + (4 * half + q) * 8
                acc0 = _accumulate(acc0, weights, a_ptr, k, stride_ak, in_k, A_VEC)
                if BLOCK_T > 1:
                    acc1 = _accumulate(acc1, weights, a_ptr + stride_at, k, stride_ak, in_k & (tokens > 1), A_VEC)
                if BLOCK_T > 2:
                    acc2 = _accumulate(acc2, weights, a_ptr + 2 * stride_at, k, stride_ak, in_k & (tokens > 2), A_VEC)
                    acc3 = _accumulate(acc3, weights, a_ptr + 3 * stride_at, k, stride_ak, in_k & (tokens > 3), A_VEC)
    rows = row0 + quads
    y_rows = y_ptr + rows.to(tl.int64) * stride_yn
    out_dtype = y_ptr.dtype.element_ty
    tl.store(y_rows, tl.sum(acc0, axis=0).to(out_dtype), mask=rows < N)
    if BLOCK_T > 1:
        tl.store(y_rows + stride_yt, tl.sum(acc1, axis=0).to(out_dtype), mask=(rows < N) & (quads * 0 + T > 1))
    if BLOCK_T > 2:
        tl.store(y_rows + 2 * stride_yt, tl.sum(acc2, axis=0).to(out_dtype), mask=(rows < N) & (quads * 0 + T > 2))
        tl.store(y_rows + 3 * stride_yt, tl.sum(acc3, axis=0).to(out_dtype), mask=(rows < N) & (quads * 0 + T > 3))


@triton.jit
def _strip_weights(word, scale, planes, levels_ptr, L_DTYPE: tl.constexpr, PERMUTE: tl.constexpr):
    """(M, 4) words (32 consecutive values of M rows) -> (M, 8, 4) fp32 weights, [row, j, word]
    = value 8 * word + j."""
    w0, w1, w2, w3 = _columns4(word)
    x0 = _stack8(_decode_word(w0, scale, planes, levels_ptr, L_DTYPE, PERMUTE))
    x1 = _stack8(_decode_word(w1, scale, planes, levels_ptr, L_DTYPE, PERMUTE))
    x2 = _stack8(_decode_word(w2, scale, planes, levels_ptr, L_DTYPE, PERMUTE))
    x3 = _stack8(_decode_word(w3, scale, planes, levels_ptr, L_DTYPE, PERMUTE))
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (word.shape[0], 8, 4))


@triton.jit
def _finish_token(acc, t, split, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T: tl.constexpr):
    """One token's column sums (threads summed): the output when there is one split, else its
    split's partial."""
    total = tl.sum(acc, axis=0)
    if n_splits == 1:
        tl.store(out_ptr + t * stride_ot + cols * stride_ok, total.to(out_ptr.dtype.element_ty))
    else:
        tl.store(partial_ptr + (split * BLOCK_T + t) * K + cols, total)


@triton.jit
def _reduce_token(t, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T: tl.constexpr):
    """The last program of a strip: one token's split partials summed in split order, written out."""
    total = tl.zeros(cols.shape, dtype=tl.float32)
    for split in range(0, n_splits):  # fixed order: reproducible bits
        total += tl.load(partial_ptr + (split * BLOCK_T + t) * K + cols, cache_modifier=".cg")
    tl.store(out_ptr + t * stride_ot + cols * stride_ok, total.to(out_ptr.dtype.element_ty))


@triton.jit
def nf4_decode_t_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    levels_ptr,
    nested_code_ptr,
    nested_absmax_ptr,
    offset_ptr,
    partial_ptr,
    counter_ptr,
    out_ptr,
    T,
    N,
    blocks_per_row,
    rows_per_split,
    n_splits,
    stride_at,
    stride_an,
    stride_ot,
    stride_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    L_DTYPE: tl.constexpr,
    PERMUTE: tl.constexpr,
):
    """Decode `g = a @ Lt` for T <= BLOCK_T (1, 2 or 4): g[t, k] = sum_n a[t, n] Lt[n, k], in out's
    dtype. a (T, N) any strides; Lt (N, K) NF4 as in `nf4_decode_kernel`, K = 64 * blocks_per_row; partial (n_splits,
    BLOCK_T, K) fp32 scratch; counter (K // 32,) int32, zero on entry and on exit.

    Grid: (K // 32, n_splits). A program owns a strip of 32 columns (half a scale block, 16 bytes
    a row) and its split's rows, BLOCK_N (= 32 * num_warps) at a time, one row a thread: one
    16-byte load, the row's byte planes, 4 words x 8 weights times the row's activation. Each
    thread keeps its strip's 32 sums per token in registers over the whole split; threads are
    summed once at the end. With several splits, the last program of a strip to arrive (an
    acquire-release ticket) adds the splits' partials in order and writes the output: one launch,
    reproducible. Rows past the split re-read a real row with a zero activation: no masked loads
    of codes or scales.
    """
    strip = tl.program_id(0)
    split = tl.program_id(1)
    K = blocks_per_row * 64
    row_words = blocks_per_row * 8  # a multiple of 8 words to the compiler: 16-byte loads
    words = packed_ptr.to(tl.pointer_type(tl.uint32))
    lanes = tl.arange(0, BLOCK_N)
    word_cols = strip * 4 + tl.arange(0, 4)
    acc0 = tl.zeros((BLOCK_N, 8, 4), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, 8, 4), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, 8, 4), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, 8, 4), dtype=tl.float32)
    n_start = split * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + lanes
        in_n = rows < n_end
        rows64 = tl.minimum(rows, N - 1).to(tl.int64)
        scale = _block_scales(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                              rows64 * blocks_per_row + strip // 2, in_n, DOUBLE_QUANT)  # fmt: skip
        if PERMUTE:
            planes = _byte_planes(scale, L_DTYPE)
        else:
            planes = scale  # unused
        weights = _strip_weights(tl.load(words + rows64[:, None] * row_words + word_cols[None, :]), scale, planes,
                                 levels_ptr, L_DTYPE, PERMUTE)  # fmt: skip
        a_rows = a_ptr + rows64 * stride_an
        acc0 += weights * tl.load(a_rows, mask=in_n, other=0.0).to(tl.float32)[:, None, None]
        if BLOCK_T > 1:
            a1 = tl.load(a_rows + stride_at, mask=in_n & (lanes * 0 + T > 1), other=0.0).to(tl.float32)
            acc1 += weights * a1[:, None, None]
        if BLOCK_T > 2:
            a2 = tl.load(a_rows + 2 * stride_at, mask=in_n & (lanes * 0 + T > 2), other=0.0).to(tl.float32)
            acc2 += weights * a2[:, None, None]
            a3 = tl.load(a_rows + 3 * stride_at, mask=in_n & (lanes * 0 + T > 3), other=0.0).to(tl.float32)
            acc3 += weights * a3[:, None, None]
    # Column of [j, word]: 8 * word + j within the strip.
    cols = strip * 32 + tl.arange(0, 4)[None, :] * 8 + tl.arange(0, 8)[:, None]
    _finish_token(acc0, 0, split, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T)
    if BLOCK_T > 1:
        if T > 1:
            _finish_token(acc1, 1, split, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T)
    if BLOCK_T > 2:
        if T > 2:
            _finish_token(acc2, 2, split, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T)
        if T > 3:
            _finish_token(acc3, 3, split, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T)
    if n_splits > 1:
        tl.debug_barrier()  # all threads' partials stored before the ticket's release (as in K3)
        ticket = tl.atomic_add(counter_ptr + strip, 1, sem="acq_rel")
        if ticket == n_splits - 1:
            _reduce_token(0, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T)
            for t in range(1, T):
                _reduce_token(t, partial_ptr, out_ptr, cols, K, stride_ot, stride_ok, n_splits, BLOCK_T)
            tl.atomic_xchg(counter_ptr + strip, 0)  # zero again for the next launch (or graph replay)
