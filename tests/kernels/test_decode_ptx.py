"""The byte-permute decoding of the NF4 decode kernels, run on the CPU instruction by instruction.

The decode kernels look NF4 weights up with PTX (`nf4_kernels._byte_planes_ptx`,
`_decode_word_ptx`), which only a GPU runs; the interpreter tier checks the kernels' portable path
instead. So the PTX the package ships is executed here by a small emulator of the instructions
it uses (PTX ISA semantics: `prmt.b32` default mode, round-to-nearest-even `cvt.rn`, `mul.rn.f32`),
over random code words and every byte value, and compared bit for bit with `level[code] * scale`
rounded to the core's dtype, as bitsandbytes dequantises.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fura_kernels.nf4 import NF4_LEVELS
from fura_kernels.triton import nf4_kernels

U32 = np.uint32


def _immediate(token: str) -> np.ndarray:
    if token.startswith("0f"):
        return np.array(int(token[2:], 16), dtype=U32)
    return np.array(int(token, 0), dtype=U32)


def _to_16(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """fp32 values -> their 16-bit pattern in `dtype`, rounded to nearest-even (torch's cast)."""
    half = torch.from_numpy(values.astype(np.float32)).to(dtype)
    return half.view(torch.int16).numpy().astype(np.uint16).astype(U32)


def _prmt(a: np.ndarray, b: np.ndarray, selector: np.ndarray) -> np.ndarray:
    """`prmt.b32` default mode: output byte i is byte (c >> 4i) & 7 of {b, a}, replaced by its
    sign replicated when bit 3 of that nibble is set."""
    source = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(np.broadcast(a, b, selector).shape, dtype=U32)
    for i in range(4):
        nibble = (selector >> U32(4 * i)) & U32(0xF)
        byte = ((source >> ((nibble & U32(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)).astype(U32)
        byte = np.where(nibble & U32(8), np.where(byte & U32(0x80), U32(0xFF), U32(0)), byte)
        out |= byte << U32(8 * i)
    return out


def run_ptx(ptx: str, operands: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Execute an inline-asm body over numpy arrays of 32-bit patterns; `$n` operands in and out."""
    regs: dict[str, np.ndarray] = {f"${n}": value.astype(U32) for n, value in operands.items()}

    def read(token: str) -> np.ndarray:
        return regs[token] if token in regs else _immediate(token)

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32":  # mov.b32 {lo, hi}, x
            lo, hi, src = re.fullmatch(r"\{(\w+), (\w+)\}, (\S+)", rest).groups()
            regs[lo], regs[hi] = read(src) & U32(0xFFFF), read(src) >> U32(16)
            continue
        args = [t.strip() for t in rest.split(",")]
        dst, srcs = args[0], [read(t) for t in args[1:]]
        if op == "mul.rn.f32":
            result = (srcs[0].view(np.float32) * srcs[1].view(np.float32)).astype(np.float32).view(U32)
        elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
            dtype = torch.bfloat16 if "bf16" in op else torch.float16
            result = (_to_16(srcs[0].view(np.float32), dtype) << U32(16)) | _to_16(srcs[1].view(np.float32), dtype)
        elif op == "cvt.f32.f16":
            result = torch.from_numpy(srcs[0].astype(np.uint16).view(np.float16).astype(np.float32)).numpy().view(U32)
        elif op == "prmt.b32":
            result = _prmt(*srcs)
        elif op == "and.b32":
            result = srcs[0] & srcs[1]
        elif op == "or.b32":
            result = srcs[0] | srcs[1]
        elif op == "shr.b32":
            result = srcs[0] >> srcs[1]
        elif op == "shl.b32":
            result = srcs[0] << srcs[1]
        else:
            raise AssertionError(f"instruction the emulator does not know: {line!r}")
        regs[dst] = np.asarray(result, dtype=U32)
    return {n: regs[f"${n}"] for n in range(8)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_byte_permute_decoding_matches_the_dequantised_weights(dtype):
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    convert = "cvt.rn.bf16x2.f32" if dtype == torch.bfloat16 else "cvt.rn.f16x2.f32"
    rng = np.random.default_rng(0)
    # Scales as bitsandbytes stores them (positive), a negative and a zero one (double
    # quantisation can land a near-zero block there), and ones whose products round in ties.
    scales = np.concatenate([rng.uniform(1e-4, 2.0, 29), [-0.37, 0.0, 1.0 + 2**-8]]).astype(np.float32)
    words_per_scale = 640
    words = rng.integers(0, 2**32, (scales.size, words_per_scale), dtype=np.uint64).astype(U32)
    words[:, :256] = np.arange(256, dtype=U32) * U32(0x01010101)  # every byte value, in every byte
    scale_bits = np.repeat(scales.view(U32)[:, None], words_per_scale, axis=1)

    planes = run_ptx(nf4_kernels._byte_planes_ptx(convert), {8: scale_bits})
    decoded = run_ptx(nf4_kernels._decode_word_ptx(name), {8: words, **{9 + i: planes[i] for i in range(8)}})
    got = np.stack([decoded[j] for j in range(8)], axis=-1)  # [..., j]: weight j of the word

    # Weight 2i is byte i's high nibble, 2i + 1 its low nibble (FURA_SPEC.md §5).
    shifts = np.array([8 * (j // 2) + 4 * (1 - j % 2) for j in range(8)], dtype=U32)
    codes = torch.from_numpy(((words[..., None] >> shifts) & U32(0xF)).astype(np.int64))
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    expected = (levels[codes] * torch.from_numpy(scales)[:, None, None]).to(dtype).float()
    mismatched = got != expected.numpy().view(U32)
    assert not mismatched.any(), f"{int(mismatched.sum())} of {mismatched.size} {name} weights differ"
