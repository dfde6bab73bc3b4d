"""The QFuRA linear map: FuRA's minimal Function with the frozen L core stored in NF4."""

from __future__ import annotations

import torch

from ..nf4 import NF4Tensor
from ..triton.nf4_ops import nf4_dequantize, nf4_matmul, nf4_merge
from .common import backward_with_graph, check_input, no_autocast, stage, stage_backward
from .fura_linear import recomputing_in_backward, use_weight_side_merge


class QFuRALinearFunction(torch.autograd.Function):
    """`y = x · blockdiag(R') · Lt^T + bias` in the default layout (one output block), where
    `Lt = L[0]^T` (out x n*r) is NF4 and `R'_j = R_j · diag(S_j)`.

    Inputs: `x` (T, in) in the compute dtype; `btt_r` (n, b, r), `btt_s` (1, n, r) or None,
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
        n, b, r = btt_r.shape
        tokens, out = x.shape[0], state.shape[0]
        dtype = x.dtype
        scale = btt_s.reshape(n, r) if btt_s is not None else None  # folded into R inside the kernels
        bias_c = bias.to(dtype) if bias is not None else None
        with no_autocast(x.device.type):
            if use_weight_side_merge(tokens, 1, n, out, False, recomputing_in_backward()):
                y = torch.nn.functional.linear(x, nf4_merge(state, btt_r, scale, dtype), bias_c)
            else:
                y = nf4_matmul(stage(x.reshape(tokens, n, b), btt_r, scale).reshape(tokens, n * r), state)
                if bias_c is not None:
                    y = y + bias_c
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
        needs_x, needs_r, needs_s, needs_bias = ctx.needs_input_grad[:4]
        nones = (None,) * 6
        if torch.is_grad_enabled():  # create_graph=True: the backward itself must be differentiable
            btt_l = nf4_dequantize(state, dy.dtype).t().unsqueeze(0)  # frozen: a constant here
            needs = (needs_x, False, needs_r, needs_s, needs_bias)
            dx, _, d_r, d_s, d_bias = backward_with_graph("qfura_linear", dy, x, btt_l, btt_r, btt_s, ctx.bias_dtype,
                                                          needs)  # fmt: skip
            return dx, d_r, d_s, d_bias, *nones
        n, b, r = btt_r.shape
        tokens = dy.shape[0]
        dx = d_r = d_s = d_bias = None
        with no_autocast(dy.device.type):
            if needs_x or ctx.need_g_r:
                g = nf4_matmul(dy, state, transpose=True)
                scale = btt_s.reshape(n, r) if btt_s is not None else None
                xb = None if x is None else x.reshape(tokens, n, b)
                dxb, d_r, d_s = stage_backward(g.reshape(tokens, n, r), xb, btt_r, scale, needs_x, needs_r, needs_s)
                if needs_x:
                    dx = dxb.reshape(tokens, n * b)
                if needs_s:
                    d_s = d_s.reshape(btt_s.shape)
            if needs_bias:
                d_bias = dy.sum(dim=0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(ctx.bias_dtype)
        return dx, d_r, d_s, d_bias, *nones


def _state(packed, absmax, offset, nested_absmax, nested_code, meta) -> NF4Tensor:
    rows, cols, dtype = meta
    return NF4Tensor(packed=packed, absmax=absmax, shape=(rows, cols), dtype=dtype, offset=offset,
                     nested_absmax=nested_absmax, nested_code=nested_code)  # fmt: skip


def qfura_linear(
    x: torch.Tensor,
    state: NF4Tensor,
    btt_r: torch.Tensor,
    btt_s: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `QFuRALinearFunction` to `x` of shape (..., in); computes in `x.dtype`."""
    check_input(x, "qfura_linear")
    lead = x.shape[:-1]
    tensors = (state.packed, state.absmax, state.offset, state.nested_absmax, state.nested_code)
    y = QFuRALinearFunction.apply(x.reshape(-1, x.shape[-1]), btt_r, btt_s, bias, *tensors, (*state.shape, state.dtype))
    return y.reshape(*lead, y.shape[-1])
