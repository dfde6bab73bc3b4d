"""`step2_s_scaled_bmm` equals the reference's `bmm(inner, L ⊙ s)`, values and gradients."""

from __future__ import annotations

import pytest
import torch

from fura_kernels import step2_s_scaled_bmm

from .helpers import DTYPE_IDS, assert_within_rule, max_rel_err


def _reference_step2(inner, btt_l, btt_s):
    """The reference's formulation: scale the weight, then bmm (autograd does the rest)."""
    if btt_s is None:
        return torch.bmm(inner, btt_l)
    m, n, r = btt_s.shape
    return torch.bmm(inner, btt_l * btt_s.reshape(m, n * r, 1))


def _inputs(m, tokens, n, r, a, dtype=torch.float64, with_s=True, l_grad=False):
    inner = torch.randn(m, tokens, n * r, dtype=dtype, requires_grad=True)
    btt_l = torch.randn(m, n * r, a, dtype=dtype, requires_grad=l_grad)
    btt_s = (torch.rand(m, n, r, dtype=dtype) + 0.5).requires_grad_() if with_s else None
    return inner, btt_l, btt_s


@pytest.mark.parametrize("m, tokens, n, r, a", [(1, 7, 8, 6, 40), (3, 1, 4, 5, 11), (2, 33, 3, 7, 13)])
@pytest.mark.parametrize("with_s", [True, False])
@pytest.mark.parametrize("l_grad", [False, True])
def test_step2_matches_reference_float64(m, tokens, n, r, a, with_s, l_grad):
    inner, btt_l, btt_s = _inputs(m, tokens, n, r, a, with_s=with_s, l_grad=l_grad)
    out = step2_s_scaled_bmm(inner, btt_l, btt_s)
    ref = _reference_step2(inner, btt_l, btt_s)
    assert out.shape == (m, tokens, a)
    assert max_rel_err(out, ref) < 1e-12
    dout = torch.randn_like(out)
    wrt = [t for t in (inner, btt_l, btt_s) if t is not None and t.requires_grad]
    ours = torch.autograd.grad((out * dout).sum(), wrt)
    theirs = torch.autograd.grad((ref * dout).sum(), wrt)
    for g, g_ref in zip(ours, theirs, strict=True):
        assert max_rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_step2_low_precision_within_rule(dtype):
    inner64, l64, s64 = _inputs(2, 19, 4, 8, 24)
    inner = inner64.detach().to(dtype).requires_grad_()
    s = s64.detach().float().requires_grad_()  # trainable S in fp32, as FuRA keeps it
    btt_l = l64.detach().to(dtype)
    dout = torch.randn(2, 19, 24, dtype=torch.float64)
    ours_out = step2_s_scaled_bmm(inner, btt_l, s)
    ours = torch.autograd.grad((ours_out * dout.to(dtype)).sum(), [inner, s])
    inner2 = inner64.detach().to(dtype).requires_grad_()
    s2 = s64.detach().float().requires_grad_()
    same_out = _reference_step2(inner2, btt_l, s2.to(dtype))
    same = torch.autograd.grad((same_out * dout.to(dtype)).sum(), [inner2, s2])
    ref_out = _reference_step2(inner64, l64, s64)
    ref = torch.autograd.grad((ref_out * dout).sum(), [inner64, s64])
    assert_within_rule(ours_out.detach(), same_out.detach(), ref_out.detach(), dtype, "step2 out")
    for name, g, g_same, g_ref in zip(("inner", "s"), ours, same, ref, strict=True):
        assert_within_rule(g, g_same, g_ref, dtype, f"step2 d{name}")


def test_step2_bad_shapes():
    inner, btt_l, btt_s = _inputs(2, 5, 3, 4, 6)
    with pytest.raises(ValueError, match="step2_s_scaled_bmm: expected inner"):
        step2_s_scaled_bmm(inner[:, :, :-1], btt_l, btt_s)
    with pytest.raises(ValueError, match="expected btt_s \\(m, n, r\\)"):
        step2_s_scaled_bmm(inner, btt_l, btt_s[:, :2])
    with pytest.raises(TypeError, match="not floating point"):
        step2_s_scaled_bmm(torch.ones(2, 5, 12, dtype=torch.int64), btt_l, btt_s)
