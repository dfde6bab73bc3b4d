"""Roofline floors (FURA_SPEC.md §3): the fastest a step could run on this machine.

Every figure is `max(F / peak_flops, B / bandwidth)` with the peak matmul rate and copy
bandwidth measured at the start of the run (the ceilings), so "% of floor" is relative to this
machine, not to a datasheet.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ceilings:
    matmul_flops: float  # FLOP/s of a large matmul in the benchmark dtype
    copy_bytes: float  # bytes/s moved (read + write) by a device-to-device copy


def roofline_ms(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    return 1e3 * max(flops / ceilings.matmul_flops, nbytes / ceilings.copy_bytes)


def k1_cost(tokens: int, in_f: int, n: int, r: int, elem: int) -> tuple[float, float]:
    """K1, z = x · blockdiag(R'): F = 2*T*in*r, B = elem*T*(in + n*r)."""
    return 2.0 * tokens * in_f * r, elem * tokens * (in_f + n * r)


def gemm_cost(tokens: int, k: int, out_f: int, elem: int) -> tuple[float, float]:
    """One big GEMM (T x k) · (k x out): F = 2*T*k*out, B = elem*(T*k + k*out + T*out)."""
    return 2.0 * tokens * k * out_f, elem * (tokens * k + k * out_f + tokens * out_f)


def k3_cost(tokens: int, in_f: int, n: int, r: int, elem: int) -> tuple[float, float]:
    """K3, dx and G: F = 4*T*in*r, B = elem*(2*T*in + T*n*r)."""
    return 4.0 * tokens * in_f * r, elem * (2 * tokens * in_f + tokens * n * r)


def merge_cost(in_f: int, out_f: int, r: int, elem: int) -> tuple[float, float]:
    """Weight-side merge W_eff = L^T · blockdiag(R'): F = 2*in*out*r, B = elem*2*in*out."""
    return 2.0 * in_f * out_f * r, elem * 2.0 * in_f * out_f


def nf4_dequant_cost(numel: int, elem: int) -> tuple[float, float]:
    """Read 0.5 B codes + absmax (1 B per 64 with double quantisation), write `elem` bytes."""
    return 0.0, numel * (0.5 + elem) + numel / 64


def nf4_gemm_cost(tokens: int, k: int, out_f: int, elem: int) -> tuple[float, float]:
    """Fused small-T NF4 GEMM: the core is read once at about 0.52 bytes a value."""
    return 2.0 * tokens * k * out_f, k * out_f * (0.5 + 1 / 64) + elem * tokens * (k + out_f)


def dense_step_floor_ms(tokens: int, in_f: int, out_f: int, elem: int, c: Ceilings) -> float:
    """Frozen nn.Linear forward + dx: two GEMMs."""
    return 2 * roofline_ms(*gemm_cost(tokens, in_f, out_f, elem), c)


# The two forward paths of FuRA's default layout (FURA_SPEC.md §3), as a floor names them.
ACTIVATION_SIDE = "activation-side"  # K1 on x, GEMM z · L, backward GEMM dy · L^T, K3
WEIGHT_SIDE = "weight-side"  # merge W_eff = L^T · blockdiag(R'), GEMM x · W_eff^T, then the same backward
# Methods whose code takes the weight-side merge where `use_weight_side_merge` says so
# (FusedBTTLinear, QFusedBTTLinear). The PEFT form transforms the activations always, and the
# reference re-implementation has no merge.
MERGING_METHODS = ("fura", "qfura")


def fura_floor_path(method: str, tokens: int, out_f: int, n: int) -> str:
    """The forward path `method` takes at `tokens` tokens: the floor follows the code."""
    from fura_kernels.autograd import use_weight_side_merge

    if method in MERGING_METHODS and use_weight_side_merge(tokens, 1, n, out_f, need_g_l=False):
        return WEIGHT_SIDE
    return ACTIVATION_SIDE


def fura_step_floor_ms(
    tokens: int, in_f: int, out_f: int, n: int, r: int, elem: int, c: Ceilings, path: str = ACTIVATION_SIDE
) -> float:
    """FuRA forward + backward in the default layout, on `path`: activation side, K1 + two big
    GEMMs + K3; weight side, the merge + the GEMM on x + the backward GEMM + K3."""
    backward = roofline_ms(*gemm_cost(tokens, n * r, out_f, elem), c) + roofline_ms(
        *k3_cost(tokens, in_f, n, r, elem), c
    )
    if path == WEIGHT_SIDE:
        return (
            roofline_ms(*merge_cost(in_f, out_f, r, elem), c)
            + roofline_ms(*gemm_cost(tokens, in_f, out_f, elem), c)
            + backward
        )
    if path != ACTIVATION_SIDE:
        raise ValueError(f"fura_step_floor_ms: path {path!r}; expected {ACTIVATION_SIDE!r} or {WEIGHT_SIDE!r}")
    return (
        roofline_ms(*k1_cost(tokens, in_f, n, r, elem), c)
        + roofline_ms(*gemm_cost(tokens, n * r, out_f, elem), c)
        + backward
    )
