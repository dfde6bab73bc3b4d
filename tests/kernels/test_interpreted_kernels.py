"""K1 and K3 run by Triton's CPU interpreter against the float64 reference.

This tier runs in its own process with `TRITON_INTERPRET=1` set before anything imports
Triton (`bash .ci/run` does that); in a plain run it is skipped.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from fura_kernels import FusedBTTLinear
from fura_kernels.autograd import use_weight_side_merge
from fura_kernels.triton import autotuning, block_diag_matmul, block_diag_matmul_backward, use_triton
from fura_kernels.triton.block_diag import torch_block_diag_backward, torch_block_diag_matmul

from ..helpers import DTYPE_IDS, assert_within_rule, unfused_same_dtype

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tier: run with TRITON_INTERPRET=1 (bash .ci/run does)"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (T, nblk, K, N): odd sizes that leave masked edges in every tile (the interpreter tiles are
# 32 wide), T = 1, b = 96, a block wider than one K tile, N spanning several column tiles.
SHAPES = [(1, 3, 37, 23), (70, 4, 64, 64), (33, 2, 96, 96), (45, 5, 16, 100), (17, 1, 131, 7)]
SHAPE_IDS = ["T1-prime", "T70-64", "b96", "N100", "K131"]


def _x(tokens, nblk, k, dtype, layout):
    if layout == "strided":  # the last dim is not contiguous
        return torch.randn(tokens, nblk, 2 * k, dtype=dtype)[..., ::2]
    if layout == "token-major":  # tokens are the innermost dim
        return torch.randn(nblk, k, tokens, dtype=dtype).permute(2, 0, 1)
    return torch.randn(tokens, nblk, k, dtype=dtype)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "token-major"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_k1_block_diag_matmul(dtype, shape, layout):
    tokens, nblk, k, n = shape
    x = _x(tokens, nblk, k, dtype, layout)
    w = torch.randn(nblk, k, n, dtype=dtype) / k**0.5
    assert use_triton(x)
    y = block_diag_matmul(x, w)
    ref = torch.einsum("tjk,jkn->tjn", x.double(), w.double())
    assert y.shape == (tokens, nblk, n) and y.dtype == dtype
    assert_within_rule(y, torch_block_diag_matmul(x, w), ref, dtype, "K1")


@pytest.mark.parametrize("outputs", ["both", "dx", "dw"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_k3_block_diag_backward(dtype, shape, outputs):
    tokens, nblk, k, n = shape
    x = _x(tokens, nblk, k, dtype, "strided")
    w = torch.randn(nblk, k, n, dtype=dtype) / k**0.5
    g = torch.randn(tokens, nblk, n, dtype=dtype)
    want_dx, want_dw = outputs in ("both", "dx"), outputs in ("both", "dw")
    dx, dw = block_diag_matmul_backward(g, x, w, want_dx, want_dw)
    same_dx, same_dw = torch_block_diag_backward(g, x, w, want_dx, want_dw)
    if want_dx:
        ref = torch.einsum("tjn,jkn->tjk", g.double(), w.double())
        assert dx.dtype == dtype
        assert_within_rule(dx, same_dx, ref, dtype, "K3 dx")
    else:
        assert dx is None
    if want_dw:
        ref = torch.einsum("tjk,tjn->jkn", x.double(), g.double())
        assert dw.dtype == torch.float32 and dw.shape == (nblk, k, n)
        assert_within_rule(dw, same_dw, ref, dtype, "K3 G")
    else:
        assert dw is None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_k3_multi_split_reduction_is_exact_and_deterministic(dtype):
    tokens = 1100
    rows, splits = autotuning.split_rows(tokens)
    assert splits == 3 and rows % autotuning.SPLIT_ROW_ALIGN == 0
    x = torch.randn(tokens, 2, 16, dtype=dtype)
    g = torch.randn(tokens, 2, 24, dtype=dtype)
    w = torch.randn(2, 16, 24, dtype=dtype)
    first = block_diag_matmul_backward(g, x, w)
    second = block_diag_matmul_backward(g, x, w)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref = torch.einsum("tjk,tjn->jkn", x.double(), g.double())
    assert_within_rule(first[1], torch_block_diag_backward(g, x, w)[1], ref, dtype, "K3 G over 3 splits")


def test_k3_wide_blocks_fall_back_to_k1_for_dx():
    n = autotuning.MAX_FUSED_N + 44
    x, g, w = torch.randn(9, 2, 20), torch.randn(9, 2, n), torch.randn(2, 20, n)
    dx, dw = block_diag_matmul_backward(g, x, w)
    assert_within_rule(dx, torch_block_diag_backward(g, x, w)[0], torch.einsum("tjn,jkn->tjk", g.double(), w.double()),
                       torch.float32, "dx")  # fmt: skip
    assert torch.allclose(dw, torch.einsum("tjk,tjn->jkn", x, g), rtol=1e-5, atol=1e-4)


LAYER_CASES = [
    # (mode, in, out, leading dims): T < out takes the activation side, T > out the weight-side merge
    ("output_one_block", 96 * 3, 40, (3, 5)),
    ("output_one_block", 96 * 3, 40, (64,)),
    ("output_one_block", 97, 40, (1,)),
    ("input_one_block", 60, 36, (2, 7)),
    ("square", 60, 36, (2, 7)),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-T{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_layer_gradients_on_the_triton_path(dtype, case):
    """Forward and every gradient through FuRALinearFunction with Triton kernels inside."""
    mode, in_f, out_f, lead = case
    layer = FusedBTTLinear.from_linear(nn.Linear(in_f, out_f), decomp_mode=mode)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    ref_layer = copy.deepcopy(layer).double()
    x = torch.randn(*lead, 2 * in_f)[..., ::2]  # strided input
    dy = torch.randn(*lead, out_f)
    assert use_triton(x.to(dtype))
    tokens = x[..., 0].numel()
    shape = layer.block_shape
    merge = use_weight_side_merge(tokens, shape.m, shape.n, out_f, False)
    assert merge == (mode == "output_one_block" and tokens > out_f and shape.n > 1)

    params = [p for p in layer.parameters() if p.requires_grad]
    x_low = x.to(dtype).requires_grad_()
    y = layer(x_low)
    ours = torch.autograd.grad((y * dy.to(dtype)).sum(), [x_low, *params])
    x_same = x.to(dtype).requires_grad_()
    y_same = unfused_same_dtype(layer, x_same)
    same = torch.autograd.grad((y_same * dy.to(dtype)).sum(), [x_same, *params])
    x64 = x.double().requires_grad_()
    ref_params = [p for p in ref_layer.parameters() if p.requires_grad]
    y_ref = unfused_same_dtype(ref_layer, x64)
    ref = torch.autograd.grad((y_ref * dy.double()).sum(), [x64, *ref_params])
    assert_within_rule(y.detach(), y_same.detach(), y_ref.detach(), dtype, f"{mode} y")
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, g, g_same, g_ref in zip(names, ours, same, ref, strict=True):
        assert_within_rule(g, g_same, g_ref, dtype, f"{mode} d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_empty_batch_on_the_triton_path(dtype):
    """T = 0: K1 returns an empty output and K3 a zero block gradient (its split count used to
    divide by zero); a layer behaves like nn.Linear."""
    w = torch.randn(3, 16, 8, dtype=dtype)
    assert use_triton(w)
    assert block_diag_matmul(torch.randn(0, 3, 16, dtype=dtype), w).shape == (0, 3, 8)
    dx, dw = block_diag_matmul_backward(torch.randn(0, 3, 8, dtype=dtype), torch.randn(0, 3, 16, dtype=dtype), w)
    assert dx.shape == (0, 3, 16) and dw.shape == (3, 16, 8) and not dw.any()
    assert autotuning.split_rows(0)[1] == 0
    layer = FusedBTTLinear.from_linear(nn.Linear(48, 20))
    x = torch.randn(2, 0, 48, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 20) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and not layer.btt_r.grad.any() and not layer.btt_s.grad.any()
