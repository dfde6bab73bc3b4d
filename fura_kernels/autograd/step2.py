"""`step2_s_scaled_bmm`: a drop-in for the reference implementation's second stage.

The reference computes `out[i] = inner[i] @ (btt_l[i] ⊙ s[i])`, materialising the weight-sized
`L ⊙ S` every step and, because `S` requires grad, running a full weight-gradient GEMM for
`dS`. The same function is `(inner ⊙ s) @ L`: scale the activation, not the weight, and take
`dS` from the activation-sized product that the input gradient needs anyway. The reference
calls this when `FURA_FUSED_STEP2=1` (FURA_SPEC.md §4).
"""

from __future__ import annotations

import torch

from .common import no_autocast


def _check(inner: torch.Tensor, btt_l: torch.Tensor, btt_s: torch.Tensor | None) -> None:
    if inner.dim() != 3 or btt_l.dim() != 3 or inner.shape[0] != btt_l.shape[0] or inner.shape[2] != btt_l.shape[1]:
        raise ValueError(
            "step2_s_scaled_bmm: expected inner (m, T, n*r) and btt_l (m, n*r, a), got "
            f"inner {tuple(inner.shape)} and btt_l {tuple(btt_l.shape)}"
        )
    if btt_s is not None and (
        btt_s.dim() != 3 or btt_s.shape[0] != inner.shape[0] or btt_s.shape[1] * btt_s.shape[2] != inner.shape[2]
    ):
        raise ValueError(
            f"step2_s_scaled_bmm: expected btt_s (m, n, r) with m={inner.shape[0]} and n*r={inner.shape[2]}, "
            f"got {tuple(btt_s.shape)}"
        )
    if not inner.dtype.is_floating_point:
        raise TypeError(f"step2_s_scaled_bmm: inner dtype {inner.dtype} is not floating point")


class Step2SScaledBmm(torch.autograd.Function):
    """`out[i] = (inner[i] ⊙ s[i]) @ L[i]`, s broadcast over T; computed in `inner.dtype`.

    Chain rule, with `g[i] = dout[i] @ L[i]^T` (the one big GEMM of the backward):

        d inner[i] = g[i] ⊙ s[i]
        d s[i]     = sum over T of inner[i] ⊙ g[i]              (reshaped to (n, r))
        d L[i]     = (inner[i] ⊙ s[i])^T @ dout[i]              (only if L requires grad)

    Saved: `inner` (the caller's activation, no copy) and the parameters. Nothing weight-sized
    is built unless `L` itself requires grad.
    """

    @staticmethod
    def forward(ctx, inner, btt_l, btt_s):
        m, _, nr = inner.shape
        with no_autocast(inner.device.type):
            scaled = inner if btt_s is None else inner * btt_s.reshape(m, 1, nr).to(inner.dtype)
            out = torch.bmm(scaled, btt_l.to(inner.dtype))
        ctx.save_for_backward(inner, btt_l, btt_s)
        return out

    @staticmethod
    def backward(ctx, dout):
        inner, btt_l, btt_s = ctx.saved_tensors
        m, _, nr = inner.shape
        d_inner = d_l = d_s = None
        with no_autocast(dout.device.type):
            s = None if btt_s is None else btt_s.reshape(m, 1, nr).to(dout.dtype)
            g = torch.bmm(dout, btt_l.to(dout.dtype).transpose(1, 2))
            if ctx.needs_input_grad[0]:
                d_inner = g if s is None else g * s
            if btt_s is not None and ctx.needs_input_grad[2]:
                acc = torch.promote_types(dout.dtype, torch.float32)
                d_s = (inner.to(acc) * g.to(acc)).sum(dim=1).reshape(btt_s.shape).to(btt_s.dtype)
            if ctx.needs_input_grad[1]:
                scaled = inner if s is None else inner * s
                d_l = torch.bmm(scaled.transpose(1, 2), dout).to(btt_l.dtype)
        return d_inner, d_l, d_s


def step2_s_scaled_bmm(inner: torch.Tensor, btt_l: torch.Tensor, btt_s: torch.Tensor | None = None) -> torch.Tensor:
    """`out[i] = (inner[i] ⊙ s[i]) @ btt_l[i]`: inner (m, T, n*r), btt_l (m, n*r, a),
    btt_s (m, n, r) or None -> (m, T, a). Differentiable in all three."""
    _check(inner, btt_l, btt_s)
    return Step2SScaledBmm.apply(inner, btt_l, btt_s)
