"""Launch configurations for K1 and K3: a short list, pruned to the problem and the device.

Keys are bucketed: the autotuner keys on `t_bucket` (T rounded up to a power of two), never on
raw T, so a new batch or sequence length reuses the tuned config instead of re-tuning.
Under `TRITON_INTERPRET=1` autotuning with several configs is broken (FURA_SPEC.md §7): one
fixed config per kernel is used instead.
"""

from __future__ import annotations

import torch
import triton

from .plans import INTERPRET, capability, cdiv, next_power_of_2

# Smallest tile side `tl.dot` accepts.
MIN_TILE = 16
# K3 holds one block's whole output width in a tile; 256 covers every FuRA block we know of
# (r <= 128 for Llama/Qwen shapes) while the fp32 accumulator still fits in registers.
MAX_FUSED_N = 256
# T buckets stop growing here: above this every T is bandwidth-bound the same way.
MAX_T_BUCKET = 1 << 16

# K3's deterministic split of T, sized by a target number of programs rather than by T: about
# K3_TARGET_PROGRAMS (split, block) pairs, a few per SM of an H100 (132 SMs), so the fp32 partials
# are at most about K3_TARGET_PROGRAMS x K x N values whatever T is (8.4 MB on Llama's q/k, 36.7 MB
# on down_proj's 128 x 128 blocks; they grew with T before). A split still needs enough rows to
# amortise writing its partial: at least SPLIT_MIN_ROWS.
K3_TARGET_PROGRAMS = 512
SPLIT_MIN_ROWS = 512
SPLIT_MAX = 32
# Split boundaries are multiples of this, a multiple of every BLOCK_T below, so a tile never
# straddles two splits.
SPLIT_ROW_ALIGN = 256

# (BLOCK_T, BLOCK_K, BLOCK_N, num_warps, num_stages). BLOCK_T >= 64 keeps every dot eligible for
# Hopper's wgmma (M >= 64 with 4 warps); the spread of K and N tiles covers b, r in 64..128.
K1_CONFIGS = [
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 32, "BLOCK_N": 128}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_T": 256, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
]
# (BLOCK_T, BLOCK_K, num_warps, num_stages); BLOCK_N is the block's output width (see MAX_FUSED_N).
# Hopper: BLOCK_K >= 64 keeps the G = x^T g dot on wgmma too. Every config compiles, as
# production launches it (run-time K and N), without spilling and with register headroom
# (tests/kernels/test_compile.py). Dropped: (128, 128, 8 warps, 2 stages), at 244-252
# registers of 255 under Triton 3.6-3.9 with a 128-wide block.
K3_CONFIGS_HOPPER = [
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]
# Ampere's mma.sync keeps operand fragments in registers: the larger Hopper tiles spill there
# (up to 6.9 KB of stack for 128 x 128), so sm_80 gets smaller tiles. Dropped: (64, 64, 4 warps,
# 2 stages), at 255 registers (the limit) with a 128-wide block under Triton 3.6-3.9.
K3_CONFIGS_AMPERE = [
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
K3_CONFIGS = K3_CONFIGS_HOPPER + K3_CONFIGS_AMPERE


def k3_configs_for(capability_major: int) -> list[triton.Config]:
    """K3's production configs for a GPU generation."""
    return K3_CONFIGS_HOPPER if capability_major >= 9 else K3_CONFIGS_AMPERE


# Last resorts when no listed config fits a GPU's shared memory (a 256-wide block on a 99 KB
# consumer part, say): the smallest tiles `tl.dot` takes well, one pipeline stage.
K1_MINIMAL = triton.Config({"BLOCK_T": 32, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
K3_MINIMAL = triton.Config({"BLOCK_T": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
# Interpreter configs: small tiles, so the small test shapes still cover several K iterations,
# several row tiles and masked edges.
K1_INTERPRET_META = {"BLOCK_T": 32, "BLOCK_K": 32, "BLOCK_N": 32}
K3_INTERPRET_META = {"BLOCK_T": 32, "BLOCK_K": 32}

# Accumulator registers per thread above which a config is dropped: Hopper has 255 per thread,
# and the loads, pointers and the other tile need the rest.
MAX_ACC_REGS_PER_THREAD = 128


def t_bucket(tokens: int) -> int:
    """T rounded up to a power of two (at least 16, at most MAX_T_BUCKET): the autotune key."""
    return min(max(MIN_TILE, next_power_of_2(tokens)), MAX_T_BUCKET)


def tile_cap(size: int) -> int:
    """The largest useful tile side for a dimension of `size`."""
    return max(MIN_TILE, next_power_of_2(size))


def split_rows(tokens: int, nblk: int = 1) -> tuple[int, int]:
    """`(rows_per_split, n_splits)` for K3's reduction over T: a function of the shape alone (never
    of the GPU or the tuned config), so the fixed-order sum gives the same bits everywhere. An
    empty batch has no split (and a positive row count, so nothing divides by zero)."""
    wanted = min(cdiv(K3_TARGET_PROGRAMS, max(nblk, 1)), SPLIT_MAX)
    n = min(max(cdiv(tokens, SPLIT_MIN_ROWS), 1), wanted)
    rows = max(cdiv(cdiv(tokens, n), SPLIT_ROW_ALIGN), 1) * SPLIT_ROW_ALIGN
    return rows, cdiv(tokens, rows)


def shared_memory_limit(capability: tuple[int, int]) -> int:
    """Bytes of shared memory one program may use on a GPU of this compute capability."""
    major, minor = capability
    if major >= 9:
        return 227 * 1024
    if (major, minor) in ((8, 0), (8, 7)):
        return 163 * 1024
    return 99 * 1024


def k1_shared_bytes(cfg: triton.Config, elem: int) -> int:
    kw = cfg.kwargs
    return cfg.num_stages * (kw["BLOCK_T"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem


def k3_shared_bytes(cfg: triton.Config, block_n: int, elem: int) -> int:
    kw = cfg.kwargs
    resident_w = kw["BLOCK_K"] * block_n * elem
    return resident_w + cfg.num_stages * kw["BLOCK_T"] * (block_n + kw["BLOCK_K"]) * elem


def _config_key(cfg: triton.Config):
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def _clamped(configs, caps: dict[str, int]) -> list[triton.Config]:
    """Clamp tile sides to the problem (a 16-wide block needs no 128-wide tile) and dedupe."""
    seen, out = set(), []
    for cfg in configs:
        kwargs = {k: min(v, caps[k]) if k in caps else v for k, v in cfg.kwargs.items()}
        clamped = triton.Config(kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if _config_key(clamped) not in seen:
            seen.add(_config_key(clamped))
            out.append(clamped)
    return out


def select_k1(configs, k: int, n: int, t_bucket: int, elem: int, capability: tuple[int, int]):
    """K1 configs for a problem: tiles clamped to it, those that fit in shared memory."""
    caps = {"BLOCK_T": tile_cap(t_bucket), "BLOCK_K": tile_cap(k), "BLOCK_N": tile_cap(n)}
    limit = shared_memory_limit(capability)
    kept = [c for c in _clamped(configs, caps) if k1_shared_bytes(c, elem) <= limit]
    return kept or _clamped([K1_MINIMAL], caps)


def select_k3(configs, k: int, block_n: int, t_bucket: int, elem: int, capability: tuple[int, int]):
    """K3 configs for a problem: this GPU generation's list, clamped, fitting in shared memory
    and leaving registers for more than the accumulators."""
    caps = {"BLOCK_T": tile_cap(t_bucket), "BLOCK_K": tile_cap(k)}
    arch_keys = {_config_key(c) for c in k3_configs_for(capability[0])}
    configs = [c for c in configs if _config_key(c) in arch_keys]
    limit = shared_memory_limit(capability)
    kept = [
        c
        for c in _clamped(configs, caps)
        if k3_shared_bytes(c, block_n, elem) <= limit
        and c.kwargs["BLOCK_K"] * block_n // (32 * c.num_warps) <= MAX_ACC_REGS_PER_THREAD
    ]
    return kept or _clamped([K3_MINIMAL], caps)


def prune_k1(configs, named_args, **kwargs):
    """`early_config_prune` hook of K1's autotuner."""
    x = named_args["x_ptr"]
    k, n, bucket = named_args["K"], named_args["N"], named_args["t_bucket"]
    return select_k1(configs, k, n, bucket, x.element_size(), capability(x.device))


def prune_k3(configs, named_args, **kwargs):
    """`early_config_prune` hook of K3's autotuner (BLOCK_N comes from the launcher)."""
    g = named_args["g_ptr"]
    block_n = kwargs.get("BLOCK_N", tile_cap(named_args["N"]))
    return select_k3(configs, named_args["K"], block_n, named_args["t_bucket"], g.element_size(), capability(g.device))


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own TF32 setting, so the kernels are as exact as `torch.matmul`.
    (`_get_cublas_allow_tf32` is what `torch.backends.cuda.matmul.allow_tf32` reads, without its
    Python `__getattr__`: this is asked on every fp32 launch.)"""
    if dtype == torch.float32 and torch._C._get_cublas_allow_tf32() and not INTERPRET:
        return "tf32"
    return "ieee"
