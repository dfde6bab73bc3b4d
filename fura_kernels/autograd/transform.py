"""The transform form's input map as a `torch.autograd.Function`: `x'_j = x_j · M_j` per block.

In the transform form (FURA_SPEC.md §11) a FuRA layer leaves its base layer untouched and
feeds it a block-wise transformed input, `y = base(x')`. This Function is that transform: K1
forward, K3 backward (`dx` and the block gradient `dM` in one launch, reduced over T in a fixed
order in fp32). The small maps `M_j = R_j · diag(S_j / S0_j) · V0_j` are built by the caller
with ordinary tensor ops, so autograd carries `dM` on to `dR` and `dS` (b x b batched products,
nothing activation- or weight-sized).
"""

from __future__ import annotations

import torch

from .. import reference
from ..triton.ops import block_diag_backward_unchecked, block_diag_matmul_unchecked
from .common import autocast_would_recast, check_input, direct_apply, no_autocast, stage, stage_backward


class BlockTransformFunction(torch.autograd.Function):
    """`x' = x · blockdiag(M)`: `x` (..., n*b) in the compute dtype, `maps` (n, b, b) in any float
    dtype (fp32 trainables need no cast; the kernels read them as they are).

    Forward:   x'_j = x_j · M_j                        (K1; one dense GEMM when n = 1)
    Backward:  dx_j = dx'_j · M_j^T                    (K3)
               dM_j = x_j^T · dx'_j                    (K3, reduced over T in fp32, in M's dtype)

    Saved for backward: `x` only when `maps` needs a gradient, and `maps` itself (a reference).
    A backward with `create_graph=True` differentiates the einsum reference instead.
    """

    @staticmethod
    def forward(ctx, x, maps):
        # Autocast is turned off only where it would change a GEMM here (see autocast_would_recast).
        if torch._C._is_any_autocast_enabled() and autocast_would_recast(x):
            with no_autocast(x.device.type):
                out = _transform(x, maps)
        else:
            out = _transform(x, maps)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, maps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, maps = ctx.saved_tensors
        needs_x, needs_maps = ctx.needs_input_grad[:2]
        n, b, _ = maps.shape
        if torch.is_grad_enabled():  # create_graph=True: the same products, differentiable
            g3 = grad_out.reshape(-1, n, b)
            dx = reference.transform_forward(grad_out, maps.transpose(1, 2).to(grad_out.dtype)) if needs_x else None
            d_maps = None
            if needs_maps:
                d_maps = torch.einsum("tjd,tje->jde", x.reshape(-1, n, b).to(maps.dtype), g3.to(maps.dtype))
            return dx, d_maps
        if torch._C._is_any_autocast_enabled() and autocast_would_recast(grad_out):
            with no_autocast(grad_out.device.type):
                return _transform_backward(grad_out, x, maps, needs_x, needs_maps)
        return _transform_backward(grad_out, x, maps, needs_x, needs_maps)


def _transform(x, maps):
    n, b, _ = maps.shape
    if n > 1:  # K1 reads x (..., n*b) flat, as it is
        return block_diag_matmul_unchecked(x, maps, None, False)
    # One block: a dense GEMM on x viewed as (T, 1, b) (inside the Function: no autograd node).
    return stage(x.reshape(-1, n, b), maps).view(x.shape)


def _transform_backward(grad_out, x, maps, needs_x, needs_maps):
    n, b, _ = maps.shape
    if n > 1:  # K3 on the flat activations: dx comes back in their layout
        dx, d_maps, _ = block_diag_backward_unchecked(grad_out, x, maps, None, needs_x, needs_maps, False)
        return dx, d_maps
    x3 = x.reshape(-1, n, b) if x is not None else None
    dx, d_maps, _ = stage_backward(grad_out.reshape(-1, n, b), x3, maps, None, needs_x, needs_maps, False)
    return (dx.view(grad_out.shape) if dx is not None else None), d_maps


# `BlockTransformFunction.apply` for the layers' hot path (see `direct_apply`).
apply_block_transform = direct_apply(BlockTransformFunction)


def block_transform(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Apply `BlockTransformFunction` to `x` of shape (..., n*b); computes in `x.dtype`."""
    check_input(x, "block_transform")
    return apply_block_transform(x, maps)
