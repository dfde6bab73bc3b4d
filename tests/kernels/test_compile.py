"""Every production config of K1 and K3 compiles for H100 (sm_90) and A100 (sm_80) on the CPU.

On sm_90 a kernel with a dot must lower to `wgmma`, fit in shared memory and not spill; on
sm_80 the same source must lower to `mma.sync` (no Hopper-only instruction) and also fit
without spilling. FURA_SPEC.md §7 explains the mechanism.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real GPU code; not under the interpreter"
)

from fura_kernels.triton import autotuning  # noqa: E402

from . import compile_check as cc  # noqa: E402

# The block widths FuRA meets on Llama-3-8B and Qwen3 (b and r of 64, 96, 128).
WIDTHS = [64, 96, 128]
ARCHS = [90, 80]


def _check(kernel: cc.CompiledKernel, what: str) -> None:
    assert kernel.shared_bytes <= cc.SHARED_LIMIT[kernel.arch], f"{what}: {kernel.shared_bytes} B of shared memory"
    assert not kernel.spills, f"{what}: spills (stack {kernel.stack_bytes} B, local {kernel.local_bytes} B)"
    if kernel.arch == 90:
        assert kernel.uses_wgmma, f"{what}: no wgmma on sm_90"
    else:
        assert kernel.uses_mma_sync and not kernel.uses_wgmma, f"{what}: expected mma.sync only on sm_80"


def _ids(cfg):
    kw = cfg.kwargs
    return "x".join(str(v) for v in kw.values()) + f"-w{cfg.num_warps}-s{cfg.num_stages}"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("cfg", autotuning.K1_CONFIGS, ids=_ids)
def test_k1_compiles(cfg, arch):
    for width in WIDTHS:
        for dtype in ("bf16", "fp16"):
            _check(cc.compile_k1(cfg, dtype, width, width, arch), f"K1 {dtype} {width} {_ids(cfg)} sm_{arch}")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("cfg", autotuning.K1_CONFIGS, ids=_ids)
def test_k1_compiles_for_the_weight_side_merge(cfg, arch):
    """The merge's layout: x is L^T (tokens are L's contiguous axis), w is R^T (fp32, K-major),
    S scales w's rows. Production runs it whenever T > out (Llama's k/v at T >= 1024)."""
    for width in (64, 128):
        _check(
            cc.compile_k1(cfg, "bf16", width, width, arch, layout="merge"), f"K1 merge {width} {_ids(cfg)} sm_{arch}"
        )


@pytest.mark.parametrize(
    "arch, cfg",
    [(90, c) for c in autotuning.K3_CONFIGS_HOPPER] + [(80, c) for c in autotuning.K3_CONFIGS_AMPERE],
    ids=lambda v: f"sm{v}" if isinstance(v, int) else _ids(v),
)
def test_k3_compiles(arch, cfg):
    assert autotuning.k3_configs_for(arch // 10) == (
        autotuning.K3_CONFIGS_HOPPER if arch == 90 else autotuning.K3_CONFIGS_AMPERE
    )
    for width in WIDTHS:
        for dtype in ("bf16", "fp16"):
            _check(cc.compile_k3(cfg, dtype, width, width, arch), f"K3 {dtype} {width} {_ids(cfg)} sm_{arch}")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
def test_nf4_fused_gemm_compiles(arch, transpose):
    for block_t in (16, 32, 64):  # T <= 64 is padded to one of these
        for dtype in ("bf16", "fp16"):
            kernel = cc.compile_nf4_matmul(dtype, block_t, arch, transpose)
            _check(kernel, f"NF4 GEMM {dtype} T<={block_t} transpose={transpose} sm_{arch}")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_nf4_dequantize_compiles(arch):
    for dtype in ("bf16", "fp16"):
        kernel = cc.compile_nf4_dequantize(dtype, arch)
        assert kernel.shared_bytes <= cc.SHARED_LIMIT[arch] and not kernel.spills, f"NF4 dequant {dtype} sm_{arch}"


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (8, 6)], ids=lambda c: f"sm{c[0]}{c[1]}")
@pytest.mark.parametrize("tokens", [1, 512, 16384])
@pytest.mark.parametrize("width", WIDTHS + [16, 300])
def test_config_pruning_fits_every_gpu(capability, tokens, width):
    """The autotuners' pruning, run as on a GPU: never empty, always within shared memory, K3 on
    its generation's list, tiles no larger than the problem needs."""
    bucket = autotuning.t_bucket(tokens)
    k1 = autotuning.select_k1(autotuning.K1_CONFIGS, width, width, bucket, 2, capability)
    assert k1 and all(autotuning.k1_shared_bytes(c, 2) <= autotuning.shared_memory_limit(capability) for c in k1)
    assert all(c.kwargs["BLOCK_K"] <= autotuning.tile_cap(width) for c in k1)
    block_n = autotuning.tile_cap(min(width, autotuning.MAX_FUSED_N))
    k3 = autotuning.select_k3(autotuning.K3_CONFIGS, width, block_n, bucket, 2, capability)
    allowed = autotuning.K3_CONFIGS_HOPPER if capability[0] >= 9 else autotuning.K3_CONFIGS_AMPERE
    assert k3 and all(c.num_warps in {a.num_warps for a in allowed} for c in k3)
    assert all(autotuning.k3_shared_bytes(c, block_n, 2) <= autotuning.shared_memory_limit(capability) for c in k3)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_last_resort_configs_compile(arch):
    """The minimal configs pruning falls back to on small-shared-memory GPUs build and fit too."""
    for kernel in (cc.compile_k1(autotuning.K1_MINIMAL, "bf16", 128, 128, arch),
                   cc.compile_k3(autotuning.K3_MINIMAL, "bf16", 256, 256, arch)):  # fmt: skip
        assert kernel.shared_bytes <= 99 * 1024 and not kernel.spills


@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_nf4_decode_compiles(arch, transpose):
    """The decode kernels (T <= 4): packed codes arrive in 16-byte vector loads, the math stays on
    CUDA cores (no MMA, so nothing is padded to 16 tokens), no spills on sm_90 or sm_80."""
    for dtype in ("bf16", "fp16"):
        kernel = cc.compile_nf4_decode(dtype, arch, transpose)
        what = f"NF4 decode {dtype} transpose={transpose} sm_{arch}"
        assert "ld.global.v4.b32" in kernel.ptx, f"{what}: no 16-byte loads"
        assert not kernel.uses_mma_sync and not kernel.uses_wgmma, f"{what}: uses MMA"
        assert not kernel.spills and kernel.shared_bytes <= cc.SHARED_LIMIT[arch], what
