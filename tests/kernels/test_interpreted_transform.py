"""The transform form's layer (`fura_kernels.peft.FuRALinear`) with K1/K3 run by Triton's CPU
interpreter, against the float64 reference: output and every gradient, fp32/fp16/bf16, odd
shapes, T = 1, T = 0, 3-D strided input. In a plain run (no TRITON_INTERPRET) it is skipped."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fura_kernels import reference
from fura_kernels.peft import FuRALinear, FuRAPeftConfig
from fura_kernels.triton import use_triton

from ..helpers import DTYPE_IDS, assert_within_rule

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tier: run with TRITON_INTERPRET=1 (bash .ci/run does)"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (in, out, input_factorization, lead dims): b = 96; a prime out; 8 blocks of 8; one token; a 3-D batch.
CASES = [
    (288, 131, [3, 96], (2, 7)),
    (64, 53, None, (1,)),
    (120, 40, [8, 15], (3, 5, 4)),
    (96, 64, None, (45,)),
]
CASE_IDS = ["b96-out131", "T1-out53", "b15-3d", "T45"]


def _layer(in_f, out_f, factorization, dtype):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(dtype)
    config = FuRAPeftConfig(input_factorization=factorization, progress_bar=False)
    layer = FuRALinear(base, "default", config, module_name="proj")
    with torch.no_grad():  # a trained adapter, not the identity it starts as
        layer.fura_R["default"].add_(0.05 * torch.randn_like(layer.fura_R["default"]))
        layer.fura_S["default"].mul_(1 + 0.2 * torch.randn_like(layer.fura_S["default"]))
        layer.fura_bias["default"].add_(0.1 * torch.randn_like(layer.fura_bias["default"]))
    return layer


def _unfused(layer, x, dtype, params):
    """`base(x · blockdiag(M)) + bias update` by the einsum reference, everything in `dtype`."""
    r, s, bias = params
    v0, s0 = layer.fura_V0["default"], layer.fura_S0["default"]
    maps = reference.transform_blocks(r.to(dtype), s.to(dtype), v0.to(dtype), s0.to(dtype))
    base = layer.get_base_layer()
    y = torch.nn.functional.linear(reference.transform_forward(x, maps), base.weight.to(dtype), base.bias.to(dtype))
    return y + bias.to(dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_transform_layer_forward_and_gradients_on_the_triton_path(dtype, case):
    in_f, out_f, factorization, lead = case
    layer = _layer(in_f, out_f, factorization, dtype)
    params = [layer.fura_R["default"], layer.fura_S["default"], layer.fura_bias["default"]]
    x = torch.randn(*lead, 2 * in_f)[..., ::2]  # strided input
    dy = torch.randn(*lead, out_f)
    assert use_triton(x.to(dtype))

    x_low = x.to(dtype).requires_grad_()
    y = layer(x_low)
    assert y.dtype == dtype
    ours = torch.autograd.grad((y * dy.to(dtype)).sum(), [x_low, *params])
    x_same = x.to(dtype).requires_grad_()
    y_same = _unfused(layer, x_same, dtype, params)
    same = torch.autograd.grad((y_same * dy.to(dtype)).sum(), [x_same, *params])
    x64 = x.double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in params]
    y64 = _unfused(layer, x64, torch.float64, params64)
    ref = torch.autograd.grad((y64 * dy.double()).sum(), [x64, *params64])
    assert_within_rule(y.detach(), y_same.detach(), y64.detach(), dtype, "y")
    for name, g, g_same, g_ref in zip(["x", "R", "S", "bias"], ours, same, ref, strict=True):
        assert g.dtype == (dtype if name == "x" else torch.float32), name
        assert_within_rule(g, g_same, g_ref, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_empty_batch_through_the_transform(dtype):
    layer = _layer(64, 24, None, dtype)
    x = torch.randn(2, 0, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape and not layer.fura_R["default"].grad.any()
