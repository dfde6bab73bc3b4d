"""Second derivatives through FuRA layers are exact, or refused with a clear error.

They used to be silently wrong: `gradgradcheck` failed for every configuration (Hessian-vector
products off by 9.7 on R and 15 on S), because the backward ran non-differentiable kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck

from fura_kernels import FuRAConfig, FusedBTTLinear, QFusedBTTLinear, fura_linear, reference
from fura_kernels.autograd import qfura_linear

F64 = dict(svd_dtype=torch.float64, trainable_dtype=torch.float64)
CONFIGS = {
    "default": {},
    "square": dict(decomp_mode="square"),
    "train-both": dict(train_position="both"),
    "s-in-output": dict(s_merged_to="output"),
    "s-frozen": dict(s_merged_to="keep_frozen"),
    "train-large": dict(train_position="large"),
}


def _layer(in_f=12, out_f=8, **kw):
    return FusedBTTLinear.from_linear(nn.Linear(in_f, out_f).double(), FuRAConfig(**kw, **F64))


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_gradgradcheck(kw):
    layer = _layer(**kw)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(fura_linear, (x, layer.btt_l, layer.btt_r, layer.btt_s, layer.bias))


def test_hessian_vector_product_equals_the_dense_reference():
    layer = _layer(24, 16)
    params = [layer.btt_r, layer.btt_s]
    x = torch.randn(7, 24, dtype=torch.float64)
    vectors = [torch.randn_like(p) for p in params]

    def hvp(forward):
        loss = forward().pow(2).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors, strict=True))
        return torch.autograd.grad(dot, params)

    ours = hvp(lambda: layer(x))
    ref = hvp(lambda: reference.forward(x, layer.btt_l, layer.btt_r, layer.btt_s, layer.bias))
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_qfura_gradgradcheck():
    pytest.importorskip("bitsandbytes")
    layer = QFusedBTTLinear.from_linear(nn.Linear(12, 64), trainable_dtype=torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)

    def f(x, r, s, b):
        return qfura_linear(x, layer.nf4_state(), r, s, b)

    assert gradgradcheck(f, (x, layer.btt_r, layer.btt_s, layer.bias))


def test_configurations_without_the_input_saved_refuse_second_derivatives():
    layer = _layer(decomp_mode="input_one_block")  # trains the small L; x is not saved
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (grad,) = torch.autograd.grad(y.pow(2).sum(), [layer.btt_l], create_graph=False)  # first order: fine
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match="fura_linear: second derivatives need the layer input"):
        torch.autograd.grad(layer(x).pow(2).sum(), [layer.btt_l], create_graph=True)
