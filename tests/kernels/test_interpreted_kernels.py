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


def _folded64(w, scale, scale_rows):
    w64 = w.double()
    if scale is None:
        return w64
    return w64 * scale.double().unsqueeze(-1 if scale_rows else -2)


SCALES = ["none", "cols", "rows"]


@pytest.mark.parametrize("scale_mode", SCALES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "token-major"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_k1_block_diag_matmul(dtype, shape, layout, scale_mode):
    """K1 with fp32 weights (the trainable storage) and the scale folded in the kernel."""
    tokens, nblk, k, n = shape
    x = _x(tokens, nblk, k, dtype, layout)
    w = torch.randn(nblk, k, n) / k**0.5
    scale = None if scale_mode == "none" else torch.rand(nblk, k if scale_mode == "rows" else n) + 0.5
    rows = scale_mode == "rows"
    assert use_triton(x)
    y = block_diag_matmul(x, w, scale, rows)
    ref = torch.einsum("tjk,jkn->tjn", x.double(), _folded64(w, scale, rows))
    assert y.shape == (tokens, nblk, n) and y.dtype == dtype
    assert_within_rule(y, torch_block_diag_matmul(x, w, scale, rows), ref, dtype, "K1")


@pytest.mark.parametrize("outputs", ["all", "dx", "dw", "ds", "dw-ds", "dx-no-scale", "dw-no-scale"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_k3_block_diag_backward(dtype, shape, outputs):
    """dx, dR = G * S and dS = sum_K G * R from one launch, against float64."""
    tokens, nblk, k, n = shape
    x = _x(tokens, nblk, k, dtype, "strided")
    w = torch.randn(nblk, k, n) / k**0.5  # fp32, as R is stored
    scale = None if outputs.endswith("no-scale") else torch.rand(nblk, n) + 0.5
    g = torch.randn(tokens, nblk, n, dtype=dtype)
    want = {
        "all": (True, True, True), "dx": (True, False, False), "dw": (False, True, False), "ds": (False, False, True),
        "dw-ds": (False, True, True), "dx-no-scale": (True, False, False), "dw-no-scale": (False, True, False),
    }[outputs]  # fmt: skip
    ours = block_diag_matmul_backward(g, x, w, scale, *want)
    same = torch_block_diag_backward(g, x, w, scale, *want)
    gram = torch.einsum("tjk,tjn->jkn", x.double(), g.double())
    refs = (
        torch.einsum("tjn,jkn->tjk", g.double(), _folded64(w, scale, False)),
        gram if scale is None else gram * scale.double().unsqueeze(1),
        None if scale is None else (gram * w.double()).sum(dim=1),
    )
    for name, wanted, got, same_dtype, ref, dtype_expected in zip(
        ("dx", "dR", "dS"), want, ours, same, refs, (dtype, torch.float32, torch.float32), strict=True
    ):
        if not wanted:
            assert got is None, name
            continue
        assert got.dtype == dtype_expected and got.shape == ref.shape, name
        assert_within_rule(got, same_dtype, ref, dtype, f"K3 {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_k3_multi_split_reduction_is_exact_and_deterministic(dtype):
    """Several T splits and several K tiles per block: the last program to arrive reduces them in
    a fixed order (twice the same bits), and leaves the counters at zero for the next launch."""
    tokens = 1100
    rows, splits = autotuning.split_rows(tokens, 2)
    assert splits == 3 and rows % autotuning.SPLIT_ROW_ALIGN == 0
    k, n = 80, 24  # 3 K tiles of the interpreter's 32
    x = torch.randn(tokens, 2, k, dtype=dtype)
    g = torch.randn(tokens, 2, n, dtype=dtype)
    w, scale = torch.randn(2, k, n), torch.rand(2, n) + 0.5
    first = block_diag_matmul_backward(g, x, w, scale, True, True, True)
    second = block_diag_matmul_backward(g, x, w, scale, True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    gram = torch.einsum("tjk,tjn->jkn", x.double(), g.double())
    same = torch_block_diag_backward(g, x, w, scale, True, True, True)
    assert_within_rule(first[1], same[1], gram * scale.double().unsqueeze(1), dtype, "K3 dR over 3 splits")
    assert_within_rule(first[2], same[2], (gram * w.double()).sum(dim=1), dtype, "K3 dS over 3 splits, 3 K tiles")


def test_k3_partials_are_bounded_by_program_count_not_tokens():
    """The split count grows with T only until about K3_TARGET_PROGRAMS (split, block) pairs, so
    the fp32 partials stop growing too (they used to grow with T: 117 MB on down_proj at 8192)."""
    for nblk in (8, 64, 112):
        counts = [autotuning.split_rows(tokens, nblk)[1] for tokens in (8192, 65536, 1 << 20)]
        assert counts[1] == counts[2], (nblk, counts)
        assert all(c * nblk <= autotuning.K3_TARGET_PROGRAMS + nblk for c in counts), (nblk, counts)
    down_proj_partials = autotuning.split_rows(8192, 112)[1] * 112 * 128 * 128 * 4
    assert down_proj_partials < 40e6


def test_k3_wide_blocks_fall_back_to_k1_for_dx():
    n = autotuning.MAX_FUSED_N + 44
    x, g, w, scale = torch.randn(9, 2, 20), torch.randn(9, 2, n), torch.randn(2, 20, n), torch.rand(2, n) + 0.5
    dx, dw, ds = block_diag_matmul_backward(g, x, w, scale, True, True, True)
    same = torch_block_diag_backward(g, x, w, scale, True, True, True)
    ref_dx = torch.einsum("tjn,jkn->tjk", g.double(), _folded64(w, scale, False))
    assert_within_rule(dx, same[0], ref_dx, torch.float32, "dx")
    assert torch.equal(dw, same[1]) and torch.equal(ds, same[2])


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
    scale = torch.rand(3, 8)
    dx, dw, ds = block_diag_matmul_backward(
        torch.randn(0, 3, 8, dtype=dtype), torch.randn(0, 3, 16, dtype=dtype), w, scale, True, True, True
    )
    assert dx.shape == (0, 3, 16) and dw.shape == (3, 16, 8) and not dw.any() and not ds.any()
    assert autotuning.split_rows(0, 3)[1] == 0
    layer = FusedBTTLinear.from_linear(nn.Linear(48, 20))
    x = torch.randn(2, 0, 48, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 20) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and not layer.btt_r.grad.any() and not layer.btt_s.grad.any()


# Flat activations as the layers hand them to the kernels (no view of their own): (T, n*K), a
# model's (B, S, n*K), one with a size-1 dimension, and leading dimensions that do not collapse
# into one (transposed batch and sequence: the op copies those first).
FLAT_LAYOUTS = {
    "2d": lambda t, nk: torch.randn(t, nk),
    "3d": lambda t, nk: torch.randn(3, t, nk),
    "3d-seq-1": lambda t, nk: torch.randn(t, 1, nk),
    "3d-transposed": lambda t, nk: torch.randn(t, 3, nk).transpose(0, 1),
    "3d-strided": lambda t, nk: torch.randn(3, t, 2 * nk)[..., ::2],
}


@pytest.mark.parametrize("layout", FLAT_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_flat_activations_match_blocked_ones(layout, dtype):
    """K1 and K3 on flat activations (..., nblk*K), read through their strides, and S with its
    leading unit dimension, give the blocked computation's values, in the activations' layout."""
    from fura_kernels.triton.ops import block_diag_backward_unchecked, block_diag_matmul_unchecked

    nblk, k = 3, 20
    x = FLAT_LAYOUTS[layout](7, nblk * k).to(dtype)
    g = FLAT_LAYOUTS[layout](7, nblk * k).to(dtype)
    w, s = torch.randn(nblk, k, k) / k**0.5, torch.rand(1, nblk, k) + 0.5
    y = block_diag_matmul_unchecked(x, w, s, False)
    x3, g3 = x.reshape(-1, nblk, k), g.reshape(-1, nblk, k)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, nblk, k), block_diag_matmul(x3, w, s[0]), rtol=0, atol=0)
    dx, dw, ds = block_diag_backward_unchecked(g, x, w, s, True, True, True)
    dx3, dw3, ds3 = block_diag_matmul_backward(g3, x3, w, s[0], True, True, True)
    assert dx.shape == x.shape and ds.shape == s.shape
    torch.testing.assert_close(dx.reshape(-1, nblk, k), dx3, rtol=0, atol=0)
    torch.testing.assert_close(dw, dw3, rtol=0, atol=0)
    torch.testing.assert_close(ds, ds3.reshape(s.shape), rtol=0, atol=0)
