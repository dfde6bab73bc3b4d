"""Compile the kernels for a GPU architecture on a CPU-only machine, and read what came out.

Test tooling (tests/kernels/test_compile.py): it lives beside the tests, not in the package.

Triton can lower a kernel to PTX and a cubin for `sm_90` (H100) or `sm_80` (A100) with no GPU
present, using the ptxas its wheel ships (FURA_SPEC.md §7). The tests use this to check, for
every production config, that a kernel with a dot uses `wgmma` on Hopper and `mma.sync` on
Ampere, fits in shared memory, and does not spill registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fura_kernels.triton import autotuning as at
from fura_kernels.triton.kernels import block_diag_backward_kernel, block_diag_matmul_kernel

TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass
class CompiledKernel:
    arch: int
    ptx: str
    shared_bytes: int
    registers: int
    stack_bytes: int
    local_bytes: int

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def uses_mma_sync(self) -> bool:
        return "mma.sync.aligned" in self.ptx

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) from the cuobjdump that ships inside Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout

    def field(name: str) -> int:
        match = re.search(rf"\b{name}:(\d+)", text)
        if match is None:
            raise RuntimeError(f"cuobjdump printed no {name}: {text!r}")
        return int(match.group(1))

    return field("REG"), field("STACK"), field("LOCAL")


def _compile(
    fn, signature: dict, constexprs: dict, aligned: list[str], arch: int, warps: int, stages: int
) -> CompiledKernel:
    names = list(signature)
    # Production launches see 16-byte aligned pointers and strides / sizes divisible by 16;
    # without these hints Triton emits no vectorised or asynchronous copies.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    regs, stack, local = _resource_usage(compiled.asm["cubin"])
    return CompiledKernel(arch, compiled.asm["ptx"], compiled.metadata.shared, regs, stack, local)


def compile_k1(cfg: triton.Config, dtype: str, k: int, n: int, arch: int, layout: str = "activation") -> CompiledKernel:
    """K1 as a training step launches it, with the fp32 R folded with S inside the kernel:

    - `layout="activation"`: contiguous (T, nblk, K) activations, R (nblk, K, N) contiguous fp32,
      S along its columns;
    - `layout="merge"`: the weight-side merge, `x = L^T` viewed as (a, n, r) (tokens are L's
      contiguous axis) and `w = R^T` (n, r, b) (K is R's contiguous axis), S along its rows.
    """
    ptr = TRITON_TYPES[dtype]
    merge = layout == "merge"
    signature = {"x_ptr": ptr, "w_ptr": "*fp32", "s_ptr": "*fp32", "y_ptr": ptr, "T": "i32", "K": "constexpr",
                 "N": "constexpr"}  # fmt: skip
    strides = ["stride_xt", "stride_xb", "stride_xk", "stride_wb", "stride_wk", "stride_wn", "stride_sb",
               "stride_sv", "stride_yt", "stride_yb", "stride_yn"]  # fmt: skip
    unit = {"stride_xt", "stride_wk", "stride_sv", "stride_yn"} if merge else {"stride_xk", "stride_wn", "stride_sv",
                                                                                  "stride_yn"}  # fmt: skip
    signature.update({s: ("constexpr" if s in unit else "i32") for s in strides})
    signature["t_bucket"] = "i32"
    meta = {**cfg.kwargs, "SCALE": 1 if merge else 2, "UPCAST": False, "INPUT_PRECISION": "ieee"}
    signature.update({name: "constexpr" for name in meta})
    constexprs = {"K": k, "N": n, **{s: 1 for s in unit}, **meta}
    aligned = ["x_ptr", "w_ptr", "s_ptr", "y_ptr"] + [s for s in strides if s not in unit]
    return _compile(block_diag_matmul_kernel, signature, constexprs, aligned, arch, cfg.num_warps, cfg.num_stages)


def compile_k3(cfg: triton.Config, dtype: str, k: int, n: int, arch: int) -> CompiledKernel:
    """K3 as a training step launches it: dx, dR and dS from bf16/fp16 activations and the fp32
    R and S, with the in-launch reduction over T."""
    ptr = TRITON_TYPES[dtype]
    signature = {"g_ptr": ptr, "x_ptr": ptr, "w_ptr": "*fp32", "s_ptr": "*fp32", "dx_ptr": ptr, "dw_ptr": "*fp32",
                 "ds_ptr": "*fp32", "partial_ptr": "*fp32", "counter_ptr": "*i32"}  # fmt: skip
    signature.update({"T": "i32", "K": "constexpr", "N": "constexpr", "rows_per_split": "i32", "n_splits": "i32"})
    strides = [
        "stride_gt", "stride_gb", "stride_gn", "stride_xt", "stride_xb", "stride_xk", "stride_wb", "stride_wk",
        "stride_wn", "stride_sb", "stride_sn", "stride_dxt", "stride_dxb", "stride_dxk", "stride_dwb", "stride_dwk",
        "stride_dwn", "stride_dsb", "stride_dsn", "stride_ps", "stride_pb", "stride_pk",
    ]  # fmt: skip
    unit = {"stride_gn", "stride_xk", "stride_wn", "stride_sn", "stride_dxk", "stride_dwn", "stride_dsn"}
    signature.update({s: ("constexpr" if s in unit else "i32") for s in strides})
    signature["t_bucket"] = "i32"
    meta = {
        **cfg.kwargs,
        "BLOCK_N": at.tile_cap(n),
        "COMPUTE_DX": True,
        "COMPUTE_DW": True,
        "COMPUTE_DS": True,
        "HAS_SCALE": True,
        "UPCAST": False,
        "INPUT_PRECISION": "ieee",
    }
    signature.update({name: "constexpr" for name in meta})
    constexprs = {"K": k, "N": n, **{s: 1 for s in unit}, **meta}
    pointers = [name for name in signature if name.endswith("_ptr")]
    aligned = pointers + ["rows_per_split"] + [s for s in strides if s not in unit]
    return _compile(block_diag_backward_kernel, signature, constexprs, aligned, arch, cfg.num_warps, cfg.num_stages)


def _nf4_signature(a_type: str, transpose: bool) -> tuple[dict, list[str]]:
    signature = {
        "a_ptr": a_type,
        "packed_ptr": "*u8",
        "absmax_ptr": "*u8",
        "levels_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
        "nested_absmax_ptr": "*fp32",
        "offset_ptr": "*fp32",
        "partial_ptr": "*fp32",
        "T": "i32",
        "N": "i32",
        "K": "i32",
        ("n_per_split" if transpose else "k_per_split"): "i32",
        "stride_at": "i32",
        ("stride_an" if transpose else "stride_ak"): "constexpr",
    }
    aligned = ["a_ptr", "packed_ptr", "absmax_ptr", "partial_ptr", "N", "K", "stride_at"]
    return signature, aligned


def compile_nf4_matmul(dtype: str, block_t: int, arch: int, transpose: bool = False) -> CompiledKernel:
    """The fused small-T NF4 GEMM (double quantisation on), as `nf4_launchers` launches it."""
    from fura_kernels.triton import nf4_launchers as nf4_ops
    from fura_kernels.triton.nf4_kernels import nf4_matmul_kernel, nf4_matmul_t_kernel

    signature, aligned = _nf4_signature(TRITON_TYPES[dtype], transpose)
    meta = {
        "BLOCK_N": nf4_ops.NF4_BLOCK_N,
        "BLOCK_K": nf4_ops.NF4_BLOCK_K,
        "BLOCK_T": block_t,
        "DOUBLE_QUANT": True,
        "L_DTYPE": dtype,
        "UPCAST": False,
    }
    signature.update({name: "constexpr" for name in meta})
    constexprs = {("stride_an" if transpose else "stride_ak"): 1, **meta}
    kernel = nf4_matmul_t_kernel if transpose else nf4_matmul_kernel
    return _compile(kernel, signature, constexprs, aligned, arch, nf4_ops.NF4_WARPS, nf4_ops.NF4_STAGES)


def compile_nf4_dequantize(dtype: str, arch: int) -> CompiledKernel:
    """The training-path dequantisation pass (double quantisation on)."""
    from fura_kernels.triton import nf4_launchers as nf4_ops
    from fura_kernels.triton.nf4_kernels import nf4_dequantize_kernel

    signature = {
        "packed_ptr": "*u8",
        "absmax_ptr": "*u8",
        "levels_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
        "nested_absmax_ptr": "*fp32",
        "offset_ptr": "*fp32",
        "out_ptr": TRITON_TYPES[dtype],
        "numel": "i32",
        "n_bytes": "i32",
        "GROUPS": "constexpr",
        "DOUBLE_QUANT": "constexpr",
        "OUT_DTYPE": "constexpr",
    }
    constexprs = {"GROUPS": nf4_ops.DEQUANT_GROUPS, "DOUBLE_QUANT": True, "OUT_DTYPE": dtype}
    aligned = ["packed_ptr", "absmax_ptr", "out_ptr", "numel", "n_bytes"]
    return _compile(nf4_dequantize_kernel, signature, constexprs, aligned, arch, 4, 1)


def compile_nf4_decode(dtype: str, arch: int, transpose: bool = False) -> CompiledKernel:
    """A decode kernel (T <= 4, double quantisation on) as `nf4_launchers.triton_nf4_decode`
    launches it on a contiguous activation and a core whose rows are 16-byte multiples."""
    from fura_kernels.triton import nf4_launchers as nl
    from fura_kernels.triton.nf4_kernels import nf4_decode_kernel, nf4_decode_t_kernel

    ptr = TRITON_TYPES[dtype]
    scales = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
              "offset_ptr": "*fp32"}  # fmt: skip
    signature = {"a_ptr": ptr, **scales}
    if transpose:
        signature.update({"partial_ptr": "*fp32", "counter_ptr": "*i32", "out_ptr": ptr})
        sizes = ["T", "N", "K", "row_bytes", "n_per_split", "n_splits", "stride_at", "stride_an", "stride_ot",
                 "stride_ok"]  # fmt: skip
        unit = {"stride_an", "stride_ok"}
        tiles = {"BLOCK_N": nl.DECODE_T_ROWS, "BLOCK_K": nl.DECODE_T_K}
    else:
        signature["y_ptr"] = ptr
        sizes = ["T", "N", "K", "row_bytes", "stride_at", "stride_ak", "stride_yt", "stride_yn"]
        unit = {"stride_ak", "stride_yn"}
        tiles = {"BLOCK_N": nl.DECODE_ROWS, "BLOCK_K": nl.DECODE_K}
    signature.update({name: ("constexpr" if name in unit else "i32") for name in sizes})
    meta = {**tiles, "BLOCK_T": nl.DECODE_BLOCK_T, "DOUBLE_QUANT": True, "L_DTYPE": "bf16"}
    signature.update({name: "constexpr" for name in meta})
    constexprs = {**{name: 1 for name in unit}, **meta}
    aligned = [n for n in signature if n.endswith("_ptr")] + ["K", "row_bytes"]
    aligned += [n for n in sizes if n.startswith("stride") and n not in unit] + (["n_per_split"] if transpose else [])
    kernel = nf4_decode_t_kernel if transpose else nf4_decode_kernel
    return _compile(kernel, signature, constexprs, aligned, arch, nl.DECODE_WARPS, 1)
