"""The reference's unfused algorithm (bench/baselines.py) computes FuRA, at 3 D + ... FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.baselines import ReferenceBTTLinear
from fura_kernels import FusedBTTLinear

from .helpers import max_rel_err


@pytest.mark.parametrize("mode", ["output_one_block", "input_one_block", "square"])
def test_reference_algorithm_matches_fused_layer(mode):
    layer = FusedBTTLinear.from_linear(
        nn.Linear(96, 40, dtype=torch.float64), decomp_mode=mode, trainable_dtype=torch.float64
    )
    baseline = ReferenceBTTLinear(copy.deepcopy(layer))
    x = torch.randn(3, 7, 96, dtype=torch.float64)
    y, y_ref = layer(x), baseline(x)
    assert max_rel_err(y, y_ref) < 1e-12
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, p_ref in zip(layer.parameters(), baseline.layer.parameters(), strict=True):
        if p.requires_grad:
            assert max_rel_err(p.grad, p_ref.grad) < 1e-10


def test_flops_reference_versus_fused():
    """Per step: reference 3 D + 6 T in b, fused 2 D + 6 T in b (FURA_SPEC.md §2)."""
    tokens, in_f, out_f = 64, 256, 128
    layer = FusedBTTLinear.from_linear(nn.Linear(in_f, out_f))
    b = layer.block_shape.b
    dense = 2 * tokens * in_f * out_f
    small = 6 * tokens * in_f * b
    for module, expected in ((ReferenceBTTLinear(layer), 3 * dense + small), (layer, 2 * dense + small)):
        x = torch.randn(tokens, in_f, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            module(x).sum().backward()
        assert counter.get_total_flops() == expected
