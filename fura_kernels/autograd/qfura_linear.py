"""The QFuRA linear map: FuRA's minimal Function with the frozen L core stored in NF4."""

from __future__ import annotations

import torch

from ..nf4 import NF4Tensor
from ..triton.nf4_ops import nf4_dequantize, nf4_matmul_unchecked, nf4_merge
from .common import (
    autocast_would_recast,
    backward_with_graph,
    check_input,
    direct_apply,
    no_autocast,
    stage,
    stage_backward,
)
from .fura_linear import recomputing_in_backward


class QFuRALinearFunction(torch.autograd.Function):
    """`y = x · blockdiag(R') · Lt^T + bias` in the default layout (one output block), where
    `Lt = L[0]^T` (out x n*r) is NF4 and `R'_j = R_j · diag(S_j)`.

    Inputs: `x` (..., in) in the compute dtype (viewed as (T, in) inside); `btt_r` (n, b, r), `btt_s` (1, n, r) or None,
    `bias` (out,) or None; the NF4 core's tensors and `meta = (rows, cols, dtype)` (not
    differentiable; plain tensors and constants, so torch.compile traces them).

    Forward: as in `FuRALinearFunction`, merged on the weight side when `T > out`
    (`nf4_merge`: dequantise, then K1 with S folded in), else `z = x · blockdiag(R')` (K1)
    then `y = z · Lt^T` by `nf4_matmul`, whose op picks the kernel by token count (decode,
    fused tensor-core, or dequantise then cuBLAS).

    Backward, by the chain rule (Lt is frozen, so there is no dL):

        g     = dy · Lt                  (fused NF4 kernel for T <= 64, else scratch + cuBLAS)
        dx_j  = g_j · R'_j^T,  G_j = x_j^T · g_j        (K3, one launch)
        dR    = G ⊙ S,  dS = sum over b of G ⊙ R        (K3's epilogue)
        dbias = sum over T of dy

    R stays in its fp32 storage and S is a scale the kernels fold on the fly (`R'` is never
    written out).

    Saved: `x` (when R or S need a gradient), the parameters and the NF4 buffers (references).
    A dequantised core lives only inside the op that needs it.
    """

    @staticmethod
    def forward(ctx, x, btt_r, btt_s, bias, packed, absmax, offset, nested_absmax, nested_code, meta):
        state = _state(packed, absmax, offset, nested_absmax, nested_code, meta)
        # x (..., in) is viewed as (T, in) here, where the view is no node of the autograd graph.
        lead = x.shape[:-1] if x.dim() != 2 else None
        x2 = x if lead is None else x.reshape(-1, x.shape[-1])
        if torch._C._is_any_autocast_enabled() and autocast_would_recast(x):
            with no_autocast(x.device.type):
                y = _forward(x2, btt_r, btt_s, bias, state)
        else:
            y = _forward(x2, btt_r, btt_s, bias, state)
        if lead is not None:
            y = y.view(*lead, y.shape[-1])
        ctx.lead = lead
        ctx.meta = meta
        ctx.need_g_r = ctx.needs_input_grad[1] or (btt_s is not None and ctx.needs_input_grad[2])
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x if ctx.need_g_r else None, btt_r, btt_s, packed, absmax, offset, nested_absmax,
                              nested_code)  # fmt: skip
        return y

    @staticmethod
    def backward(ctx, dy):
        x, btt_r, btt_s, *state_tensors = ctx.saved_tensors
        state = _state(*state_tensors, ctx.meta)
        if torch.is_grad_enabled():  # create_graph=True: the backward itself must be differentiable
            btt_l = nf4_dequantize(state, dy.dtype).t().unsqueeze(0)  # frozen: a constant here
            needs_x, needs_r, needs_s, needs_bias = ctx.needs_input_grad[:4]
            needs = (needs_x, False, needs_r, needs_s, needs_bias)
            dx, _, d_r, d_s, d_bias = backward_with_graph("qfura_linear", dy, x, btt_l, btt_r, btt_s, ctx.bias_dtype,
                                                          needs)  # fmt: skip
            return dx, d_r, d_s, d_bias, None, None, None, None, None, None
        lead = ctx.lead
        if lead is not None:  # as in forward: viewed as (T, features), inside the Function
            dy = dy.reshape(-1, dy.shape[-1])
            x = None if x is None else x.reshape(-1, x.shape[-1])
        if torch._C._is_any_autocast_enabled() and autocast_would_recast(dy):
            with no_autocast(dy.device.type):
                dx, *grads = _backward(ctx, dy, x, btt_r, btt_s, state)
        else:
            dx, *grads = _backward(ctx, dy, x, btt_r, btt_s, state)
        if lead is not None and dx is not None:
            dx = dx.view(*lead, dx.shape[-1])
        return dx, *grads, None, None, None, None, None, None


def _forward(x, btt_r, btt_s, bias, state):
    n, b, r = btt_r.shape
    tokens, out = x.shape[0], state.shape[0]
    scale = btt_s.reshape(n, r) if btt_s is not None else None  # folded into R inside the kernels
    bias_c = bias.to(x.dtype) if bias is not None else None
    if n > 1 and tokens > out and not recomputing_in_backward():  # see use_weight_side_merge
        return torch.nn.functional.linear(x, nf4_merge(state, btt_r, scale, x.dtype), bias_c)
    y = nf4_matmul_unchecked(stage(x.reshape(tokens, n, b), btt_r, scale).reshape(tokens, n * r), state)
    return y if bias_c is None else y + bias_c


def _backward(ctx, dy, x, btt_r, btt_s, state):
    needs_x, needs_r, needs_s, needs_bias = ctx.needs_input_grad[:4]
    n, b, r = btt_r.shape
    tokens = dy.shape[0]
    dx = d_r = d_s = d_bias = None
    if needs_x or ctx.need_g_r:
        g = nf4_matmul_unchecked(dy, state, transpose=True)
        scale = btt_s.reshape(n, r) if btt_s is not None else None
        xb = None if x is None else x.reshape(tokens, n, b)
        dxb, d_r, d_s = stage_backward(g.reshape(tokens, n, r), xb, btt_r, scale, needs_x, needs_r, needs_s)
        if needs_x:
            dx = dxb.reshape(tokens, n * b)
        if needs_s:
            d_s = d_s.reshape(btt_s.shape)
    if needs_bias:
        d_bias = dy.sum(dim=0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(ctx.bias_dtype)
    return dx, d_r, d_s, d_bias


def _state(packed, absmax, offset, nested_absmax, nested_code, meta) -> NF4Tensor:
    rows, cols, dtype = meta
    return NF4Tensor(packed=packed, absmax=absmax, shape=(rows, cols), dtype=dtype, offset=offset,
                     nested_absmax=nested_absmax, nested_code=nested_code)  # fmt: skip


# `QFuRALinearFunction.apply` for the layers' hot path (see `direct_apply`).
apply_qfura_linear = direct_apply(QFuRALinearFunction)


def qfura_linear(
    x: torch.Tensor,
    state: NF4Tensor,
    btt_r: torch.Tensor,
    btt_s: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `QFuRALinearFunction` to `x` of shape (..., in); computes in `x.dtype`."""
    check_input(x, "qfura_linear")
    tensors = (state.packed, state.absmax, state.offset, state.nested_absmax, state.nested_code)
    return apply_qfura_linear(x, btt_r, btt_s, bias, *tensors, (*state.shape, state.dtype))
