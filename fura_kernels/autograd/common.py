"""Steps that both FuRA Functions (dense and NF4 L core) share: the block stages, autocast
handling, and the differentiable backward that serves second derivatives."""

from __future__ import annotations

import contextlib

import torch

from .. import reference
from ..triton import accumulate_dtype
from ..triton.block_diag import fold_scale, torch_block_diag_backward
from ..triton.ops import block_diag_backward_unchecked, block_diag_matmul_unchecked


def no_autocast(device_type: str):
    """Autocast off inside a Function (it computes in its input's dtype). The meta device has
    no autocast state, and nothing to turn off."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


# Device -> its type's name. `tensor.device.type` builds a new string at every call (about three
# times the work of the rest of a check like the one below), and the hot path asks per call.
DEVICE_TYPES: dict[torch.device, str] = {}


def device_type(t: torch.Tensor) -> str:
    """`t.device.type`, looked up."""
    device = t.device
    name = DEVICE_TYPES.get(device)
    if name is None:
        name = DEVICE_TYPES[device] = device.type
    return name


def autocast_would_recast(t: torch.Tensor) -> bool:
    """Whether an autocast region is on for `t`'s device with another dtype than `t`'s: then the
    GEMMs inside a Function (which computes in its input's dtype) must run with autocast off.

    A FuRA layer casts its input to autocast's dtype before its Function, so in training the
    answer is no and the Function skips the context manager (a few microseconds of Python a
    call); with every operand already in autocast's dtype, autocast changes nothing. (Callers on
    the hot path ask `torch._C._is_any_autocast_enabled()` first, a C call, and skip this one
    outside autocast.)"""
    if not torch._C._is_any_autocast_enabled():
        return False
    name = DEVICE_TYPES.get(t.device) or device_type(t)
    if name == "meta" or not torch.is_autocast_enabled(name):
        return False
    return torch.get_autocast_dtype(name) != t.dtype


def direct_apply(function: type[torch.autograd.Function]):
    """`function.apply` without the Python layer of `torch.autograd.Function.apply`, where that
    layer does nothing: in eager mode, with no torch.func transform active and no tensor of a
    transform left behind. The layer costs nine Python calls (binding, a generator over every
    argument) on every layer's forward; `_FunctionBase.apply`, the C entry it ends in, is called
    directly instead. torch.compile must see `function.apply` itself, so it does."""
    apply = function.apply
    apply_in_c = super(torch.autograd.Function, function).apply  # _FunctionBase.apply, bound to `function`

    def call(x, *args):
        if (
            torch.compiler.is_dynamo_compiling()  # dynamo must trace `apply`; other tracers see the C entry's ops
            or torch._C._are_functorch_transforms_active()
            or torch._C._functorch.is_functorch_wrapped_tensor(x)
        ):
            return apply(x, *args)
        return apply_in_c(x, *args)

    return call


def check_input(x: torch.Tensor, op: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{op}: input dtype {what} is not floating point; expected float32, float16 or bfloat16")


def s_for_r(btt_s: torch.Tensor, m: int, n: int, r: int) -> torch.Tensor:
    """S laid out to scale btt_r's columns: (n, m*r); a view in the default layout (m = 1)."""
    if m == 1:
        return btt_s.reshape(n, r)
    return btt_s.permute(1, 0, 2).reshape(n, m * r)


def ds_from_r_layout(d_s: torch.Tensor, m: int, n: int, r: int) -> torch.Tensor:
    """The inverse of `s_for_r`: (n, m*r) -> (m, n, r); a view when m = 1."""
    if m == 1:
        return d_s.reshape(1, n, r)
    return d_s.reshape(n, m, r).permute(1, 0, 2)


def stage(x3: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, scale_rows: bool = False):
    """One side of the factorisation, `x3[:, j] @ (w[j] * scale[j])` in x3's dtype: K1 over the
    blocks (the fold happens inside the kernel), or one dense GEMM when there is one block."""
    if w.shape[0] == 1:  # explicit sizes: reshape cannot infer a -1 when T = 0
        w_eff = fold_scale(w[0], None if scale is None else scale[0], scale_rows, x3.dtype)
        return torch.matmul(x3.reshape(x3.shape[0], x3.shape[2]), w_eff).unsqueeze(1)
    return block_diag_matmul_unchecked(x3, w, scale, scale_rows)


def stage_backward(
    grad3: torch.Tensor,
    x3: torch.Tensor | None,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    need_grad_x: bool,
    need_grad_w: bool,
    need_grad_scale: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of `stage` (scale along w's columns): `(dx, dw, dscale)` with
    `dw = (x^T grad) * scale` in w's dtype and `dscale = sum over K of (x^T grad) * w` in the
    scale's: one K3 launch over the blocks, or dense GEMMs when there is one block."""
    if w.shape[0] != 1:
        return block_diag_backward_unchecked(grad3, x3, w, scale, need_grad_x, need_grad_w, need_grad_scale)
    return torch_block_diag_backward(grad3, x3, w, scale, need_grad_x, need_grad_w, need_grad_scale)


def backward_with_graph(
    op: str,
    dy: torch.Tensor,
    x: torch.Tensor | None,
    btt_l: torch.Tensor,
    btt_r: torch.Tensor,
    btt_s: torch.Tensor | None,
    bias_dtype: torch.dtype | None,
    needs: tuple[bool, bool, bool, bool, bool],
) -> list[torch.Tensor | None]:
    """First derivatives of `y = x · W^T + bias` as differentiable functions of their inputs, for
    a backward run with `create_graph=True` (Hessian-vector products, gradient penalties).

    The fused kernels are not differentiable, so this recomputes the forward with the einsum
    reference (`fura_kernels.reference`, no weight-sized tensor) and differentiates it with
    autograd, keeping the graph. `needs` is `(x, L, R, S, bias)`. Slow, but never wrong."""
    needs_x, needs_l, needs_r, needs_s, needs_bias = needs
    if x is None:
        raise RuntimeError(
            f"{op}: second derivatives need the layer input, which this configuration does not save "
            "(R and an S folded into R are frozen); use a configuration that trains R, or first derivatives only"
        )
    dtype = dy.dtype
    wanted = [(t, need) for t, need in ((x, needs_x), (btt_l, needs_l), (btt_r, needs_r), (btt_s, needs_s))]
    inputs = [t for t, need in wanted if need]
    with torch.enable_grad():
        s = btt_s.to(dtype) if btt_s is not None else None
        y = reference.forward(x.to(dtype), btt_l.to(dtype), btt_r.to(dtype), s)
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True)) if inputs else iter(())
    out: list[torch.Tensor | None] = []
    for t, need in wanted:
        grad = next(grads) if need else None
        if need and grad is None:
            grad = torch.zeros_like(t)
        out.append(grad)
    if needs_bias:
        out.append(dy.reshape(-1, dy.shape[-1]).sum(dim=0, dtype=accumulate_dtype(dtype)).to(bias_dtype))
    else:
        out.append(None)
    return out
