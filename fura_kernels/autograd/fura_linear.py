"""The FuRA linear map as a `torch.autograd.Function`: the minimal forward and backward.

Why a custom Function: left to autograd, `L · diag(S) · R` either materialises `L ⊙ S` (a
weight-sized copy every step) or, because `S` requires grad, runs a full weight-gradient GEMM
only to reduce it to `dS` (FURA_SPEC.md §2). Here S is folded into the smaller core, `dS`
comes from the small block gradient `G`, and a training step costs one big GEMM forward and
one backward, as LoRA on a frozen base does.
"""

from __future__ import annotations

import torch

from ..triton.block_diag import fold_scale
from ..triton.ops import block_diag_backward_unchecked, block_diag_matmul_unchecked
from .common import (
    autocast_would_recast,
    backward_with_graph,
    check_input,
    direct_apply,
    ds_from_r_layout,
    no_autocast,
    s_for_r,
    stage,
    stage_backward,
)


def _input_to_output_blocks(z: torch.Tensor, m: int, n: int, r: int) -> torch.Tensor:
    """(T, n, m*r) -> (T, m, n*r). A view, no copy, unless both m > 1 and n > 1 ('square')."""
    return z.reshape(z.shape[0], n, m, r).transpose(1, 2).reshape(z.shape[0], m, n * r)


def _output_to_input_blocks(zp: torch.Tensor, m: int, n: int, r: int) -> torch.Tensor:
    """(T, m, n*r) -> (T, n, m*r), the inverse of `_input_to_output_blocks`."""
    return zp.reshape(zp.shape[0], m, n, r).transpose(1, 2).reshape(zp.shape[0], n, m * r)


def recomputing_in_backward() -> bool:
    """True while activation checkpointing re-runs a forward inside the backward pass.

    Compiled graphs plan their own recomputation: under dynamo (which must not call into torch._C
    here) and under any other tracer (AOT autograd's, export's) the answer is False. Eager asks
    the engine first, in C, so a forward outside a backward pays one Python call for the tracer
    check, not `is_compiling`'s two."""
    if torch.compiler.is_dynamo_compiling():
        return False
    return torch._C._current_graph_task_id() != -1 and not torch.compiler.is_compiling()


def use_weight_side_merge(
    tokens: int, m: int, n: int, out_features: int, need_g_l: bool, recomputing: bool = False
) -> bool:
    """Forward by merging on the weight side (FURA_SPEC.md §3) instead of the activation side?

    Only in the default layout (one output block, several input blocks) and only when the
    backward does not need `zp` (L frozen, S not folded into L). The activation side moves
    about `4*T*in` bytes through K1; the merge moves about `4*in*out` (read L, write W_eff):
    the merge wins when `out < T`. Never while checkpointing recomputes the forward: a
    recomputation must not rebuild anything weight-sized.
    """
    return m == 1 and n > 1 and not need_g_l and tokens > out_features and not recomputing


class FuRALinearFunction(torch.autograd.Function):
    """`y = x · W^T + bias` with `W = L · diag(S) · R` (layouts in `fura_kernels.reference`).

    Inputs: `x` (..., in) in the compute dtype (viewed as (T, in) inside); `btt_l` (m, n*r, a), `btt_r` (n, b, m*r),
    `btt_s` (m, n, r) or None, `bias` (out,) or None, each in its storage dtype. Everything is
    cast to `x.dtype` for compute; gradients come back in each input's own dtype.

    Forward, with `S` folded into the smaller core (R in the default mode, so `R'_j = R_j ·
    diag(S_j)` costs `n*b*r` multiplies):

        z_j   = x_j · R'_j                      input side, block-diagonal over n   (K1)
        zp    = permute(z)                      (T, n, m*r) -> (T, m, n*r), a view unless square
        y_i   = zp_i · L'_i  (+ bias)           output side, block-diagonal over m; m = 1 in
                                                the default mode: one dense GEMM

    In the default layout with `T > out`, the forward merges on the weight side instead:
    `W_eff[:, j] = L_j^T · R'_j^T` (K1, memory-bound, `in*out` elements), then `y = x · W_eff^T`
    (one dense GEMM). `W_eff` is freed after the forward; the backward below is unchanged.

    Backward, by the chain rule through each stage (`dy` is (T, m, a)):

        dzp_i = dy_i · L'_i^T                   default mode: the only big GEMM
        G^L_i = zp_i^T · dy_i                   only when L or an S folded into L needs it
        dz    = permute^-1(dzp)
        dx_j  = dz_j · R'_j^T                   (K3)
        G^R_j = x_j^T · dz_j                    (K3, reduced over T, at least fp32)
        dR    = G^R ⊙ S   (S folded into R)     else dR = G^R
        dS    = sum over b of G^R ⊙ R           (S folded into R: dS[i, j, k] = sum_d
                                                 G^R[j, d, i*r+k] · R[j, d, i*r+k])
        dL    = G^L ⊙ S   (S folded into L)     else dL = G^L
        dS    = sum over a of G^L ⊙ L           (S folded into L)
        dbias = sum over T of dy

    Saved for backward: `x` only if `G^R` is needed, `zp` only if `G^L` is needed, and the
    parameters themselves (references, not copies). `R'` is never materialised: K1 and K3 read
    the fp32 `R` and `S` and fold on the fly, and K3's epilogue writes `dR` and `dS` in their
    storage dtypes, so a default-layout step launches no cast, fold or reduction of its own. In the default mode nothing
    weight-sized is saved, and `dS` comes from the `b x r` blocks of `G^R`, not from a
    `T x in x out` weight-gradient GEMM.

    Second derivatives: a backward with `create_graph=True` takes
    `common.backward_with_graph`, which differentiates the einsum reference instead of the
    kernels (which are not differentiable), so Hessian-vector products are exact.

    Dispatch: a stage with one block is a dense GEMM (cuBLAS on a GPU); a stage with several
    goes to the block-diagonal ops of `fura_kernels.triton` (Triton K1/K3 on a GPU, PyTorch on
    the CPU).
    """

    @staticmethod
    def forward(ctx, x, btt_l, btt_r, btt_s, bias):
        # x (..., in): the default layout takes it as it is (the kernels read it flat, the GEMMs
        # fold its leading dimensions); the other layouts view it as (T, in) here, inside the
        # Function, where views are no nodes of the autograd graph.
        lead = None if x.dim() == 2 or (btt_l.shape[0] == 1 and btt_r.shape[0] > 1) else x.shape[:-1]
        x2 = x if lead is None else x.reshape(-1, x.shape[-1])
        if torch._C._is_any_autocast_enabled() and autocast_would_recast(x):
            with no_autocast(x.device.type):
                y, zp = _forward(ctx, x2, btt_l, btt_r, btt_s, bias)
        else:
            y, zp = _forward(ctx, x2, btt_l, btt_r, btt_s, bias)
        ctx.lead = lead
        # x itself is saved, not its (T, in) view: a view made here (grad mode off) would cut a
        # second derivative off from x.
        ctx.save_for_backward(x if ctx.need_g_r else None, zp, btt_l, btt_r, btt_s)
        return y if lead is None else y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, zp, btt_l, btt_r, btt_s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward itself must be differentiable
            return tuple(backward_with_graph("fura_linear", dy, x, btt_l, btt_r, btt_s, ctx.bias_dtype,
                                             ctx.needs_input_grad))  # fmt: skip
        lead = ctx.lead
        if lead is not None:  # as in forward: (..., out) viewed as (T, out)
            dy = dy.reshape(-1, dy.shape[-1])
            x = None if x is None else x.reshape(-1, x.shape[-1])
        if torch._C._is_any_autocast_enabled() and autocast_would_recast(dy):
            with no_autocast(dy.device.type):
                grads = _backward(ctx, dy, x, zp, btt_l, btt_r, btt_s)
        else:
            grads = _backward(ctx, dy, x, zp, btt_l, btt_r, btt_s)
        dx = grads[0]
        if lead is not None and dx is not None:
            dx = dx.view(*lead, dx.shape[-1])
        return dx, *grads[1:]


# The bodies of FuRALinearFunction. Every call pays for each Python step here, once per layer per
# step, so what a layer's shapes fix is read off the tensors (C calls), not recomputed by helpers,
# and no tensor op runs that the result does not need (a no-op cast or reshape is a dispatcher
# round trip all the same).
def _forward(ctx, x, btt_l, btt_r, btt_s, bias):
    m, nr, a = btt_l.shape
    n, b, _ = btt_r.shape
    r = nr // n
    flat = x.dim() == 2  # else (..., in): the default layout with several input blocks (see forward)
    tokens = x.shape[0] if flat else x.numel() // x.shape[-1]
    needs = ctx.needs_input_grad
    fold_into_r = btt_r.numel() <= btt_l.numel()
    s_needs_grad = btt_s is not None and needs[3]
    need_g_l = needs[1] or (s_needs_grad and not fold_into_r)
    need_g_r = needs[2] or (s_needs_grad and fold_into_r)
    dtype = x.dtype
    bias_c = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    zp = None
    if m == 1:
        # S goes to the kernels as a scale on R's columns (or L's rows), folded on the fly: R stays
        # in its fp32 storage and nothing is cast or folded by a launch of its own. x and S go as
        # they are (x flat, S as (1, n, r)): the ops read them through their strides.
        scale_r = btt_s if fold_into_r else None
        l_0 = btt_l[0]
        if btt_s is not None and not fold_into_r:
            l_0 = fold_scale(l_0, btt_s[0].reshape(nr), True, dtype)
        elif l_0.dtype != dtype:
            l_0 = l_0.to(dtype)
        if n > 1 and not need_g_l and tokens > a and not recomputing_in_backward():
            # Weight-side merge (see use_weight_side_merge): W_eff[:, j] = L_j^T · R'_j^T, by K1 on
            # the transposed L (flat, no copy), S on the rows of R^T; then one dense GEMM. W_eff is
            # a temporary: backward never needs it.
            w_eff = block_diag_matmul_unchecked(l_0.t(), btt_r.transpose(1, 2), scale_r, True)
            y = torch.nn.functional.linear(x, w_eff, bias_c)
        else:
            if n > 1:
                z = block_diag_matmul_unchecked(x, btt_r, scale_r, False)
            else:
                z = stage(x.reshape(tokens, 1, b), btt_r, s_for_r(btt_s, m, n, r) if scale_r is not None else None)
                z = z.reshape(tokens, nr)
            if need_g_l:
                zp = z.reshape(tokens, 1, nr)
            if not flat:  # (..., n*r): matmul folds the leading dimensions into one GEMM itself
                y = torch.matmul(z, l_0)
                if bias_c is not None:
                    y.add_(bias_c)
            else:
                y = torch.mm(z, l_0) if bias_c is None else torch.addmm(bias_c, z, l_0)  # bias in the epilogue
    else:
        scale_r = None if btt_s is None or not fold_into_r else s_for_r(btt_s, m, n, r)
        scale_l = None if btt_s is None or fold_into_r else btt_s.reshape(m, nr)
        zp = _input_to_output_blocks(stage(x.reshape(tokens, n, b), btt_r, scale_r), m, n, r)
        y = stage(zp, btt_l, scale_l, True).reshape(tokens, m * a)
        if bias_c is not None:
            y = y + bias_c
    ctx.fold_into_r = fold_into_r
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.need_g_l, ctx.need_g_r = need_g_l, need_g_r
    return y, (zp if need_g_l else None)


def _backward(ctx, dy, x, zp, btt_l, btt_r, btt_s):
    m, nr, a = btt_l.shape
    n, b, _ = btt_r.shape
    r = nr // n
    needs_x, needs_l, needs_r, needs_s, needs_bias = ctx.needs_input_grad
    fold_into_r = ctx.fold_into_r
    flat = dy.dim() == 2  # else (..., out): the default layout (see forward)
    tokens = dy.shape[0] if flat else dy.numel() // dy.shape[-1]
    dtype = dy.dtype
    dx = d_l = d_s = d_bias = d_r = None
    need_dz = needs_x or ctx.need_g_r
    need_ds_r = needs_s and fold_into_r
    g_l = None
    if m == 1 and n > 1:
        # The big GEMM (dy · L^T, as linear's product: no transposed view of our own), then K3 on
        # flat activations with S as it is: dx comes back (T, in) and dS (1, n, r), their shapes.
        l_0 = btt_l[0]
        if btt_s is not None and not fold_into_r:
            l_0 = fold_scale(l_0, btt_s[0].reshape(nr), True, dtype)
        elif l_0.dtype != dtype:
            l_0 = l_0.to(dtype)
        if ctx.need_g_l:
            dy2 = dy if flat else dy.reshape(tokens, a)
            g_l = torch.mm(zp.reshape(tokens, nr).t(), dy2).to(torch.promote_types(dtype, torch.float32)).unsqueeze(0)
        if need_dz:
            dz = torch.nn.functional.linear(dy, l_0)  # (..., n*r), the layout of dy
            scale_r = btt_s if fold_into_r else None
            dx, d_r, d_s_r = block_diag_backward_unchecked(dz, x, btt_r, scale_r, needs_x, needs_r, need_ds_r)
            if need_ds_r:
                d_s = d_s_r
    elif need_dz or ctx.need_g_l:
        acc = torch.promote_types(dtype, torch.float32)
        if m == 1:  # one input block: dense GEMMs throughout
            l_0 = (
                btt_l[0].to(dtype)
                if btt_s is None or fold_into_r
                else fold_scale(btt_l[0], btt_s[0].reshape(nr), True, dtype)
            )
            dzp = torch.mm(dy, l_0.t()).reshape(tokens, 1, nr) if need_dz else None
            if ctx.need_g_l:
                g_l = torch.mm(zp.reshape(tokens, nr).t(), dy).to(acc).unsqueeze(0)
        else:
            # L in at least fp32 (S folded in), so its block gradient keeps fp32 precision.
            l_acc = btt_l.to(acc) if btt_s is None or fold_into_r else btt_l.to(acc) * btt_s.reshape(m, nr, 1)
            dzp, g_l, _ = stage_backward(dy.reshape(tokens, m, a), zp, l_acc, None, need_dz, ctx.need_g_l, False)
        if need_dz:
            dz = _output_to_input_blocks(dzp, m, n, r)
            scale_r = None if btt_s is None or not fold_into_r else s_for_r(btt_s, m, n, r)
            xb = None if x is None else x.reshape(tokens, n, b)
            dxb, d_r, d_s_r = stage_backward(dz, xb, btt_r, scale_r, needs_x, needs_r, need_ds_r)
            if needs_x:
                dx = dxb.reshape(tokens, n * b)
            if need_ds_r:
                d_s = ds_from_r_layout(d_s_r, m, n, r)
    if needs_l or (needs_s and not fold_into_r):
        acc = torch.promote_types(dtype, torch.float32)
        if needs_l:
            s_l = btt_s.to(acc).reshape(m, nr, 1) if (btt_s is not None and not fold_into_r) else None
            d_l = (g_l if s_l is None else g_l * s_l).to(btt_l.dtype)
        if needs_s and not fold_into_r:
            d_s = (g_l * btt_l.to(acc)).sum(dim=2).reshape(m, n, r).to(btt_s.dtype)
    if needs_bias:
        dy2 = dy if flat else dy.reshape(tokens, dy.shape[-1])
        d_bias = dy2.sum(dim=0, dtype=torch.promote_types(dtype, torch.float32)).to(ctx.bias_dtype)
    return dx, d_l, d_r, d_s, d_bias


# `FuRALinearFunction.apply` for the layers' hot path (see `direct_apply`).
apply_fura_linear = direct_apply(FuRALinearFunction)


def fura_linear(
    x: torch.Tensor,
    btt_l: torch.Tensor,
    btt_r: torch.Tensor,
    btt_s: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `FuRALinearFunction` to `x` of shape (..., in); computes in `x.dtype`."""
    check_input(x, "fura_linear")
    return apply_fura_linear(x, btt_l, btt_r, btt_s, bias)
