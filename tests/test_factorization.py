"""Block shapes, ranks, core roles and the sign-canonical decomposition (FURA_SPEC.md §1, §6)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from fura_kernels import FuRAConfig, reference
from fura_kernels.factorization import (
    BlockShape,
    block_qr,
    block_svd,
    canonicalize_signs,
    closest_factor_pair,
    cores_from_svd,
    resolve_block_shape,
    resolve_roles,
)

from .helpers import naive_block_svd


@pytest.mark.parametrize(
    "d, pair", [(4096, (64, 64)), (14336, (112, 128)), (6144, (64, 96)), (97, (1, 97)), (1, (1, 1)), (12, (3, 4))]
)
def test_closest_factor_pair(d, pair):
    assert closest_factor_pair(d) == pair


def test_block_shapes_per_mode():
    assert resolve_block_shape(6144, 2048, FuRAConfig()) == BlockShape(m=1, n=64, a=2048, b=96, r=96)
    assert resolve_block_shape(6144, 2048, FuRAConfig(decomp_mode="input_one_block")) == BlockShape(
        m=32, n=1, a=64, b=6144, r=64
    )
    assert resolve_block_shape(6144, 2048, FuRAConfig(decomp_mode="square")) == BlockShape(m=32, n=64, a=64, b=96, r=64)
    # A prime input width has only the trivial factor pair.
    assert resolve_block_shape(97, 64, FuRAConfig()) == BlockShape(m=1, n=1, a=64, b=97, r=64)


def test_explicit_factorization_overrides():
    cfg = FuRAConfig(decomp_mode="square", input_factorization=(8, 12), output_factorization=(4, 10))
    assert resolve_block_shape(96, 40, cfg) == BlockShape(m=4, n=8, a=10, b=12, r=10)
    with pytest.raises(ValueError, match="'blk'.*input_factorization=\\(8, 12\\).*does not factor 100"):
        resolve_block_shape(100, 40, cfg, module_name="blk")


LLAMA8B = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)


@pytest.mark.parametrize(
    "name, in_f, out_f, mode, expected",
    [
        # output_one_block splits only the input side: only o_proj's blocks follow heads.
        ("model.layers.0.self_attn.o_proj", 4096, 4096, "output_one_block", (1, 32, 4096, 128)),
        ("model.layers.0.self_attn.q_proj", 4096, 4096, "output_one_block", (1, 64, 4096, 64)),
        ("model.layers.0.self_attn.k_proj", 4096, 1024, "input_one_block", (8, 1, 128, 4096)),
        ("model.layers.0.self_attn.q_proj", 4096, 4096, "input_one_block", (32, 1, 128, 4096)),
        ("model.layers.0.self_attn.q_proj", 4096, 4096, "square", (32, 64, 128, 64)),
        ("model.layers.0.mlp.down_proj", 14336, 4096, "output_one_block", (1, 112, 4096, 128)),
    ],
)
def test_factorize_by_head(name, in_f, out_f, mode, expected):
    shape = resolve_block_shape(in_f, out_f, FuRAConfig(decomp_mode=mode), name, LLAMA8B)
    assert (shape.m, shape.n, shape.a, shape.b) == expected


def test_factorize_by_head_off_uses_closest_pairs():
    cfg = FuRAConfig(decomp_mode="square", factorize_by_head=False)
    shape = resolve_block_shape(4096, 1024, cfg, "model.layers.0.self_attn.k_proj", LLAMA8B)
    assert (shape.m, shape.n, shape.a, shape.b) == (32, 64, 32, 64)
    shape = resolve_block_shape(4096, 4096, FuRAConfig(factorize_by_head=False), "layers.0.self_attn.o_proj", LLAMA8B)
    assert (shape.n, shape.b) == (64, 64)


def test_rank_resolution():
    assert resolve_block_shape(64, 48, FuRAConfig(rank=5)).r == 5
    with pytest.raises(ValueError, match="'lin'.*rank=9 exceeds min\\(a, b\\) = min\\(48, 8\\) = 8"):
        resolve_block_shape(64, 48, FuRAConfig(rank=9), module_name="lin")
    # A fraction picks the rank whose parameter count m*n*r*(a+b) is closest to rho*in*out.
    for rho in (0.05, 0.3, 0.5, 0.99):
        shape = resolve_block_shape(256, 192, FuRAConfig(rank=rho, decomp_mode="square"))
        per_rank = shape.m * shape.n * (shape.a + shape.b)
        target = rho * 256 * 192
        best = min(abs(r * per_rank - target) for r in range(1, min(shape.a, shape.b) + 1))
        assert abs(shape.r * per_rank - target) == best
    assert resolve_block_shape(256, 192, FuRAConfig(rank=1e-6)).r == 1


def test_roles_train_position_and_ties():
    default = resolve_block_shape(64, 48, FuRAConfig())  # |L| = 64*48 > |R| = 64*8
    assert resolve_roles(default, FuRAConfig()).train_r and not resolve_roles(default, FuRAConfig()).train_l
    large = resolve_roles(default, FuRAConfig(train_position="large"))
    assert large.train_l and not large.train_r
    both = resolve_roles(default, FuRAConfig(train_position="both"))
    assert both.train_l and both.train_r
    tie = BlockShape(m=4, n=4, a=8, b=8, r=8)  # square: |L| == |R|, ties go to L
    assert resolve_roles(tie, FuRAConfig(decomp_mode="square")).train_l
    assert resolve_roles(tie, FuRAConfig(decomp_mode="square", train_position="large")).train_l


@pytest.mark.parametrize(
    "s_merged_to, l_pow, r_pow, separate",
    [
        ("keep_trainable", 0, 0, True),
        ("keep_frozen", 0, 0, True),
        ("output", 1, 0, False),
        ("input", 0, 1, False),
        ("split", 0.5, 0.5, False),
        ("frozen", 1, 0, False),  # default mode: L is the frozen core
        ("trainable", 0, 1, False),
    ],
)
def test_s_placement(s_merged_to, l_pow, r_pow, separate):
    roles = resolve_roles(resolve_block_shape(64, 48, FuRAConfig()), FuRAConfig(s_merged_to=s_merged_to))
    assert (roles.l_s_power, roles.r_s_power, roles.s_separate) == (l_pow, r_pow, separate)
    assert roles.s_trainable == (s_merged_to == "keep_trainable")


@pytest.mark.parametrize("mode", ["output_one_block", "input_one_block", "square"])
def test_block_svd_reconstructs_in_fp32_whatever_the_weight_dtype(mode):
    weight = torch.randn(48, 60).to(torch.bfloat16)
    shape = resolve_block_shape(60, 48, FuRAConfig(decomp_mode=mode))
    u, s, vh = block_svd(weight, shape)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    btt_l, btt_r, btt_s = cores_from_svd(u, s, vh, resolve_roles(shape, FuRAConfig(decomp_mode=mode)))
    rebuilt = reference.dense_weight(btt_l, btt_r, btt_s)
    assert (rebuilt - weight.float()).abs().max() < 1e-5


def test_canonical_signs_are_the_documented_ones():
    u, _, vh = block_svd(torch.randn(30, 40), resolve_block_shape(40, 30, FuRAConfig()))
    idx = u.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(u, -2, idx) > 0).all()
    # Flipping (U column, Vh row) pairs is undone by canonicalisation.
    flip = torch.where(torch.rand(u.shape[:-2] + (1, u.shape[-1])) < 0.5, -1.0, 1.0)
    u2, vh2 = canonicalize_signs(u * flip, vh * flip.transpose(-1, -2))
    assert torch.equal(u2, u) and torch.equal(vh2, vh)


@pytest.mark.parametrize("mode", ["output_one_block", "input_one_block", "square"])
def test_same_frozen_core_across_precisions_batching_and_code_paths(mode):
    """Decomposing one weight twice gives the same core to rounding: fp32 vs fp64, all blocks
    batched vs one at a time, and vs a naive per-block SVD that is canonicalised afterwards."""
    weight = torch.randn(72, 90)
    cfg = FuRAConfig(decomp_mode=mode)
    shape = resolve_block_shape(90, 72, cfg)
    u32, s32, _ = block_svd(weight, shape, torch.float32)
    u64, s64, _ = block_svd(weight, shape, torch.float64)
    u_one, _, _ = block_svd(weight, shape, torch.float32, block_batch=1)
    assert (u32.double() - u64).abs().max() < 1e-4
    assert (s32.double() - s64).abs().max() / s64.max() < 1e-5
    assert (u_one - u32).abs().max() < 1e-5
    u_naive, _, vh_naive = naive_block_svd(weight.double(), shape.m, shape.n)
    u_naive, _ = canonicalize_signs(u_naive, vh_naive)
    assert (u_naive[..., : shape.r] - u64).abs().max() < 1e-10


def test_block_qr_is_lossless_and_canonical():
    weight = torch.randn(24, 40, dtype=torch.float64)
    shape = resolve_block_shape(40, 24, FuRAConfig(init="qr", s_merged_to="output"))
    q, ones, rr = block_qr(weight, shape, torch.float64)
    assert torch.equal(ones, torch.ones_like(ones))
    assert (torch.diagonal(rr, dim1=-2, dim2=-1) >= 0).all()
    roles = resolve_roles(shape, FuRAConfig(init="qr", s_merged_to="output"))
    assert (reference.dense_weight(*cores_from_svd(q, ones, rr, roles)) - weight).abs().max() < 1e-12
