"""NF4 kernels under Triton's CPU interpreter, against bitsandbytes' dequantisation + float64.

Runs in the kernel tier (`TRITON_INTERPRET=1`, `bash .ci/run`); skipped otherwise.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from fura_kernels import QFusedBTTLinear, reference
from fura_kernels.nf4 import NF4Tensor, dequantize_nf4
from fura_kernels.triton import use_triton
from fura_kernels.triton.nf4_ops import SCRATCH, SMALL_T_MAX, fused_nf4_supported, nf4_dequantize, nf4_matmul

from ..helpers import DTYPE_IDS, assert_within_rule, check_qfura_layer

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tier: run with TRITON_INTERPRET=1 (bash .ci/run does)"
)
bnb_functional = pytest.importorskip("bitsandbytes.functional")
HALF = [torch.float16, torch.bfloat16]


def _bnb_state(rows, cols, dtype, double_quant):
    w = torch.randn(rows, cols).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return NF4Tensor.from_bnb(packed, state), packed, state


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("shape", [(100, 192), (7, 9), (256, 320)], ids=str)
def test_dequantize_matches_bitsandbytes(shape, double_quant):
    state, packed, bnb_state = _bnb_state(*shape, torch.bfloat16, double_quant)
    assert use_triton(state.packed.float())
    # fp32 output: bit for bit; bitsandbytes computes level * scale in fp32 too.
    ours32 = nf4_dequantize(state, torch.float32)
    assert torch.equal(ours32, dequantize_nf4(state, torch.float32))
    # bf16 output: bit for bit too (the kernel rounds to nearest-even itself, see _round_to).
    assert torch.equal(nf4_dequantize(state, torch.bfloat16), bnb_functional.dequantize_4bit(packed, bnb_state))
    # into a larger shared buffer: only its head is written and returned
    buffer = torch.full((shape[0] * shape[1] + 50,), 7.0)
    view = nf4_dequantize(state, torch.float32, out=buffer)
    assert view.data_ptr() == buffer.data_ptr() and torch.equal(view, ours32) and (buffer[-50:] == 7.0).all()


@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
@pytest.mark.parametrize("tokens", [1, 16, 33, 64])
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=DTYPE_IDS.get)
# (100, 1152): N not a tile multiple, K = 18 scale blocks in several splits. (37, 320): K = 5
# blocks, so the last 128-value K tile is half masked (an output tile, transposed).
@pytest.mark.parametrize(("rows", "cols"), [(100, 1152), (37, 320)], ids=str)
def test_fused_small_t_gemm(dtype, tokens, transpose, rows, cols):
    state, packed, bnb_state = _bnb_state(rows, cols, torch.bfloat16, True)
    assert fused_nf4_supported(state, tokens)
    dense64 = bnb_functional.dequantize_4bit(packed, bnb_state).double()
    a = torch.randn(tokens, rows if transpose else cols).to(dtype)
    ours = nf4_matmul(a, state, transpose=transpose)
    same = a @ dense64.to(dtype) if transpose else a @ dense64.to(dtype).t()
    ref = a.double() @ dense64 if transpose else a.double() @ dense64.t()
    assert ours.shape == ref.shape and ours.dtype == dtype
    assert_within_rule(ours, same, ref, dtype, f"NF4 GEMM T={tokens} transpose={transpose}")
    assert torch.equal(ours, nf4_matmul(a, state, transpose=transpose))  # reproducible


@pytest.mark.parametrize("tokens", [3, SMALL_T_MAX, 150], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
def test_qfura_layer_on_the_triton_path(dtype, tokens):
    """T <= 64 takes the fused kernel, T = 150 > out the scratch buffer and the weight-side merge."""
    layer = QFusedBTTLinear.from_linear(nn.Linear(256, 96).to(dtype))
    with torch.no_grad():
        layer.btt_r.add_(0.05 * layer.btt_r.abs().mean() * torch.randn_like(layer.btt_r))
        layer.btt_s.mul_(1 + 0.05 * torch.randn_like(layer.btt_s))
    check_qfura_layer(layer, tokens, dtype)
    if tokens > SMALL_T_MAX:
        assert SCRATCH.nbytes() >= 96 * 256 * 2  # the shared buffer served this layer


def test_rows_not_a_multiple_of_64_fall_back_and_say_so_once():
    layer = QFusedBTTLinear.from_linear(nn.Linear(90, 40), module_name="odd")  # core rows: n*r = 90
    x = torch.randn(3, 90)
    with pytest.warns(UserWarning, match="'odd'.*not a multiple of 64"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(layer(x), y)
    ref = reference.forward(x.double(), layer.dequantized_l(torch.float64), layer.btt_r.double(),
                            layer.btt_s.double(), layer.bias.double())  # fmt: skip
    assert (y.double() - ref).abs().max() < 1e-4 * ref.abs().max()
