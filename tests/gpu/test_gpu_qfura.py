"""GPU tier for QFuRA: NF4 kernels and the layer at Llama-3-8B sizes, against bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fura_kernels import QFusedBTTLinear, reference
from fura_kernels.nf4 import NF4Tensor
from fura_kernels.triton.nf4_ops import nf4_dequantize, nf4_matmul

from ..helpers import assert_within_rule

pytestmark = pytest.mark.gpu
bnb_functional = pytest.importorskip("bitsandbytes.functional")
DEVICE, BF16 = "cuda", torch.bfloat16


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336)], ids=str)
def test_dequantize_bit_exact_with_bitsandbytes_cuda(shape):
    w = torch.randn(*shape, device=DEVICE, dtype=BF16)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4_dequantize(NF4Tensor.from_bnb(packed, state), BF16)
    assert torch.equal(ours, bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("tokens", [1, 16, 64])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096)], ids=str)
def test_fused_gemm_real_sizes(shape, transpose, tokens):
    w = torch.randn(*shape, device=DEVICE, dtype=BF16) / shape[1] ** 0.5
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4 = NF4Tensor.from_bnb(packed, state)
    dense = bnb_functional.dequantize_4bit(packed, state)
    a = torch.randn(tokens, shape[0] if transpose else shape[1], device=DEVICE, dtype=BF16)
    ours = nf4_matmul(a, nf4, transpose=transpose)
    same = a @ dense if transpose else a @ dense.t()
    ref = a.double() @ dense.double() if transpose else a.double() @ dense.double().t()
    assert_within_rule(ours, same, ref, BF16, f"NF4 GEMM {shape} T={tokens}")
    assert torch.equal(ours, nf4_matmul(a, nf4, transpose=transpose))


@pytest.mark.parametrize("tokens", [1, 16, 8192])
def test_qfura_layer_real_size(tokens):
    layer = QFusedBTTLinear.from_linear(nn.Linear(4096, 14336, bias=False, device=DEVICE, dtype=BF16))
    x = torch.randn(tokens, 4096, device=DEVICE, dtype=BF16, requires_grad=True)
    dy = torch.randn(tokens, 14336, device=DEVICE, dtype=BF16)
    y = layer(x)
    ours = torch.autograd.grad((y * dy).sum(), [x, layer.btt_r, layer.btt_s])
    l_bf16 = layer.dequantized_l(BF16)
    x_same = x.detach().clone().requires_grad_()
    y_same = reference.forward(x_same, l_bf16, layer.btt_r.to(BF16), layer.btt_s.to(BF16))
    same = torch.autograd.grad((y_same * dy).sum(), [x_same, layer.btt_r, layer.btt_s])
    r64 = layer.btt_r.detach().double().requires_grad_()
    s64 = layer.btt_s.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y_ref = reference.forward(x64, l_bf16.double(), r64, s64)
    ref = torch.autograd.grad((y_ref * dy.double()).sum(), [x64, r64, s64])
    assert_within_rule(y.detach(), y_same.detach(), y_ref.detach(), BF16, "QFuRA y")
    for what, g, g_same, g_ref in zip(("x", "R", "S"), ours, same, ref, strict=True):
        assert_within_rule(g, g_same, g_ref, BF16, f"QFuRA d{what}")
