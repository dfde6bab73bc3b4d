"""GPU tier: K1/K3 and the layer at real sizes, determinism, and 64-bit indexing.

Skipped without CUDA (the `gpu` marker). Shapes are Llama-3-8B's and Qwen3-1.7B's projections
(FURA_SPEC.md §1) with T up to 16384, in bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fura_kernels import FusedBTTLinear, reference
from fura_kernels.triton import block_diag_matmul, block_diag_matmul_backward, use_triton
from fura_kernels.triton.block_diag import torch_block_diag_backward, torch_block_diag_matmul

from ..helpers import assert_within_rule, unfused_same_dtype

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
BF16 = torch.bfloat16

# (name, in, out, n, b): default layout, head factorisation as in the spec's table.
LAYERS = [
    ("q_proj", 4096, 4096, 64, 64),
    ("o_proj", 4096, 4096, 32, 128),
    ("down_proj", 14336, 4096, 112, 128),
    ("qwen_down_proj", 6144, 2048, 64, 96),
]


@pytest.mark.parametrize("tokens", [1, 512, 8192, 16384])
@pytest.mark.parametrize("layer", LAYERS, ids=[lay[0] for lay in LAYERS])
def test_k1_k3_real_sizes(layer, tokens):
    _, in_f, _, n, b = layer
    x = torch.randn(tokens, n, b, device=DEVICE, dtype=BF16)
    w = torch.randn(n, b, b, device=DEVICE) / b**0.5  # R in its fp32 storage
    s = torch.rand(n, b, device=DEVICE) + 0.5  # S, folded in the kernels
    g = torch.randn(tokens, n, b, device=DEVICE, dtype=BF16)
    assert use_triton(x)
    w64 = w.double() * s.double().unsqueeze(1)
    ref_y = torch.einsum("tjk,jkn->tjn", x.double(), w64)
    assert_within_rule(block_diag_matmul(x, w, s), torch_block_diag_matmul(x, w, s), ref_y, BF16, "K1")
    ours = block_diag_matmul_backward(g, x, w, s, True, True, True)
    same = torch_block_diag_backward(g, x, w, s, True, True, True)
    gram = torch.einsum("tjk,tjn->jkn", x.double(), g.double())
    refs = (torch.einsum("tjn,jkn->tjk", g.double(), w64), gram * s.double().unsqueeze(1), (gram * w.double()).sum(1))
    for name, a, b_, ref in zip(("dx", "dR", "dS"), ours, same, refs, strict=True):
        assert_within_rule(a, b_, ref, BF16, f"K3 {name}")


@pytest.mark.parametrize("tokens", [16, 8192])
@pytest.mark.parametrize("layer", LAYERS, ids=[lay[0] for lay in LAYERS])
def test_layer_real_sizes_against_reference(layer, tokens):
    name, in_f, out_f, n, b = layer
    lin = nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=BF16)
    fura = FusedBTTLinear.from_linear(lin, input_factorization=(n, b))
    ref_layer = copy.deepcopy(fura).double()
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=BF16, requires_grad=True)
    dy = torch.randn(tokens, out_f, device=DEVICE, dtype=BF16)
    params = [fura.btt_r, fura.btt_s]
    y = fura(x)
    ours = torch.autograd.grad((y * dy).sum(), [x, *params])
    x_same = x.detach().clone().requires_grad_()
    y_same = unfused_same_dtype(fura, x_same)
    same = torch.autograd.grad((y_same * dy).sum(), [x_same, *params])
    x64 = x.detach().double().requires_grad_()
    y_ref = reference.forward(x64, ref_layer.btt_l, ref_layer.btt_r, ref_layer.btt_s)
    ref = torch.autograd.grad((y_ref * dy.double()).sum(), [x64, ref_layer.btt_r, ref_layer.btt_s])
    assert_within_rule(y.detach(), y_same.detach(), y_ref.detach(), BF16, f"{name} y")
    for what, g, g_same, g_ref in zip(("x", "R", "S"), ours, same, ref, strict=True):
        assert_within_rule(g, g_same, g_ref, BF16, f"{name} d{what}")


@pytest.mark.parametrize("tokens", [8192, 16384])
def test_backward_is_bitwise_deterministic(tokens):
    lin = nn.Linear(14336, 4096, bias=False, device=DEVICE, dtype=BF16)
    fura = FusedBTTLinear.from_linear(lin)
    x = torch.randn(tokens, 14336, device=DEVICE, dtype=BF16, requires_grad=True)
    dy = torch.randn(tokens, 4096, device=DEVICE, dtype=BF16)
    runs = []
    for _ in range(2):
        grads = torch.autograd.grad((fura(x) * dy).sum(), [x, fura.btt_r, fura.btt_s])
        runs.append([g.clone() for g in grads])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_no_int32_overflow_past_2_pow_31_elements():
    """An activation of 2^31 + elements: the last rows must be as right as the first."""
    n, b = 112, 128  # down_proj's input blocks: 14336 wide
    tokens = (1 << 31) // (n * b) + 1024
    x = torch.randn(tokens, n, b, device=DEVICE, dtype=BF16)
    w = torch.randn(n, b, b, device=DEVICE, dtype=BF16) / b**0.5
    y = block_diag_matmul(x, w)
    dx, _, _ = block_diag_matmul_backward(y, x, w, compute_grad_x=True, compute_grad_w=False)
    tail = slice(tokens - 64, tokens)
    ref_tail = torch.einsum("tjk,jkn->tjn", x[tail].float(), w.float())
    assert_within_rule(y[tail], torch_block_diag_matmul(x[tail], w), ref_tail, BF16, "K1 tail rows")
    ref_dx = torch.einsum("tjn,jkn->tjk", y[tail].float(), w.float())
    assert_within_rule(
        dx[tail], torch_block_diag_backward(y[tail], None, w, None, True, False)[0], ref_dx, BF16, "K3 tail"
    )
