"""K1 and K3 as `torch.library` custom ops, dispatching to Triton or to PyTorch.

Registered ops (namespace `fura_kernels`) have fake implementations, so a model built from
`FusedBTTLinear` compiles under `torch.compile(fullgraph=True)` without a graph break. Each op
runs the Triton kernel on CUDA for fp16/bf16/fp32 (and on the CPU under `TRITON_INTERPRET=1`,
which is how CI tests the kernels), and the PyTorch implementation otherwise. Set
`FURA_DISABLE_TRITON=1` before importing the package to force the PyTorch path, for debugging.

The public functions validate shapes once per call; the implementations below them trust them.
"""

from __future__ import annotations

import operator
import os

import torch
from torch._C import _len_torch_dispatch_stack
from torch.utils.flop_counter import register_flop_formula

from . import block_diag
from .block_diag import accumulate_dtype

try:
    from . import autotuning, launchers
    from .plans import TRITON_DEVICE_TYPE
except ImportError:  # triton is not installed (it ships for Linux only): the PyTorch path remains
    autotuning = launchers = None
    TRITON_DEVICE_TYPE = "cuda"

# Read once, at import: the hot path must not consult the environment on every call.
TRITON_DISABLED = os.environ.get("FURA_DISABLE_TRITON") == "1"
_TRITON_ON = launchers is not None and not TRITON_DISABLED
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_serves(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton kernels serve tensors of this dtype on this device."""
    return _TRITON_ON and dtype in TRITON_DTYPES and device.type == TRITON_DEVICE_TYPE


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve a tensor like `t`."""
    return triton_serves(t.dtype, t.device)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def dispatch_free(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may skip the custom op's dispatcher round trip and run its body directly.

    The round trip costs about 8 µs a call on the CPU path of this project's machine (15 µs
    against 7.5 µs for a small K1), several times per layer step, and a training step's host
    time is what a GPU waits on at small T. Only eager calls on plain tensors skip it:
    torch.compile, fake tensors and dispatch modes such as FlopCounterMode must see the op.
    (`is_compiling` comes first: under tracing it is all that may run.)
    """
    if torch.compiler.is_compiling() or _len_torch_dispatch_stack():
        return False
    # Parameters count as plain: they override no torch function. Subclasses (FakeTensor,
    # DTensor, ...) may, so they keep the op.
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSOR_TYPES:
            return False
    return True


def _triton_path(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether the Triton kernels serve these operands (each of a dtype they take)."""
    return (
        _TRITON_ON
        and x.device.type == TRITON_DEVICE_TYPE
        and x.dtype in TRITON_DTYPES
        and w.dtype in TRITON_DTYPES
        and (scale is None or scale.dtype in TRITON_DTYPES)
    )


def _block_diag_matmul_impl(x, w, scale, scale_rows):
    if _triton_path(x, w, scale):
        return launchers.triton_block_diag_matmul(x, w, scale, scale_rows)
    return block_diag.torch_block_diag_matmul(x, w, scale, scale_rows)


@torch.library.custom_op("fura_kernels::block_diag_matmul", mutates_args=())
def _block_diag_matmul_op(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, scale_rows: bool
) -> torch.Tensor:
    return _block_diag_matmul_impl(x, w, scale, scale_rows)


@_block_diag_matmul_op.register_fake
def _(x, w, scale, scale_rows):
    return x.new_empty((x.shape[0], x.shape[1], w.shape[2]))


def _block_diag_backward_impl(grad_out, x, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale):
    if _triton_path(grad_out, w, scale):
        if w.shape[2] <= autotuning.MAX_FUSED_N:
            return launchers.triton_block_diag_backward(
                grad_out, x, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale
            )
        # A block too wide for one fused tile: K1 on w^T for dx (the scale is then on its rows),
        # PyTorch for the block gradients.
        grad_x = (
            launchers.triton_block_diag_matmul(grad_out, w.transpose(1, 2), scale, True) if compute_grad_x else None
        )
        _, grad_w, grad_s = block_diag.torch_block_diag_backward(
            grad_out, x, w, scale, False, compute_grad_w, compute_grad_scale
        )
        return grad_x, grad_w, grad_s
    return block_diag.torch_block_diag_backward(
        grad_out, x, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale
    )


@torch.library.custom_op("fura_kernels::block_diag_backward", mutates_args=())
def _block_diag_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    compute_grad_x: bool,
    compute_grad_w: bool,
    compute_grad_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _block_diag_backward_impl(grad_out, x, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale)
    # Custom ops return tensors, not None: an empty tensor (of the dtype the fake gives) marks a
    # skipped output.
    like = (grad_out, w, scale if scale is not None else grad_out)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like, strict=True))


@_block_diag_backward_op.register_fake
def _(grad_out, x, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale):
    tokens, nblk, n = grad_out.shape
    grad_x = grad_out.new_empty((tokens, nblk, w.shape[1]) if compute_grad_x else (0,))
    grad_w = w.new_empty(w.shape if compute_grad_w else (0,))
    grad_s = grad_out.new_empty(
        (nblk, n) if compute_grad_scale else (0,), dtype=scale.dtype if scale is not None else None
    )
    return grad_x, grad_w, grad_s


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, scale_len: int, op: str) -> None:
    if x.dim() != 3 or w.dim() != 3 or x.shape[1] != w.shape[0] or x.shape[2] != w.shape[1]:
        raise ValueError(f"{op}: expected x (T, nblk, K) and w (nblk, K, N), got {tuple(x.shape)} and {tuple(w.shape)}")
    if scale is not None and tuple(scale.shape) != (w.shape[0], scale_len):
        raise ValueError(f"{op}: expected scale ({w.shape[0]}, {scale_len}), got {tuple(scale.shape)}")
    if not (x.dtype.is_floating_point and w.dtype.is_floating_point):
        raise TypeError(f"{op}: expected floating tensors, got x {x.dtype} and w {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"{op}: x is on {x.device} but w is on {w.device}")


def block_diag_matmul(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, scale_rows: bool = False
) -> torch.Tensor:
    """K1: `y[:, j] = x[:, j] @ (w[j] * scale[j])`; x (T, nblk, K) any strides, w (nblk, K, N) in any
    float dtype (fp32 trainables need no cast), scale (nblk, K) with `scale_rows` else (nblk, N)
    or None, folded in fp32 -> (T, nblk, N) in x's dtype."""
    _check(x, w, scale, w.shape[1] if scale_rows else w.shape[2], "block_diag_matmul")
    return block_diag_matmul_unchecked(x, w, scale, scale_rows)


# `t.device.type == TRITON_DEVICE_TYPE` as a C-level attribute read (`device.type` builds a string).
_on_triton_device = operator.attrgetter("is_cuda" if TRITON_DEVICE_TYPE == "cuda" else "is_cpu")

# Where an unchecked call goes (`_route`): through the custom op, to the PyTorch implementation,
# or straight to the Triton launcher.
_VIA_OP, _VIA_TORCH, _VIA_TRITON = 0, 1, 2


def _route(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, other: torch.Tensor | None = None) -> int:
    """`dispatch_free` and `_triton_path` in one call: the unchecked entries below run once per
    layer per step, so they decide with one Python call (and `is_dynamo_compiling`'s one: any
    other tracer, AOT autograd's or export's, works through a dispatch mode, seen next)."""
    if torch.compiler.is_dynamo_compiling() or _len_torch_dispatch_stack():
        return _VIA_OP
    plain = _PLAIN_TENSOR_TYPES
    if not (
        type(x) in plain
        and type(w) in plain
        and (scale is None or type(scale) in plain)
        and (other is None or type(other) in plain)
    ):
        return _VIA_OP
    if (
        _TRITON_ON
        and _on_triton_device(x)
        and x.dtype in TRITON_DTYPES
        and w.dtype in TRITON_DTYPES
        and (scale is None or scale.dtype in TRITON_DTYPES)
    ):
        return _VIA_TRITON
    return _VIA_TORCH


def _blocked(t: torch.Tensor | None, nblk: int, width: int) -> torch.Tensor | None:
    """Flat activations (..., nblk*width) as (T, nblk, width) (a view where the leading dimensions
    allow it); blocked ones as they are."""
    if t is None or (t.dim() == 3 and t.shape[1] == nblk and t.shape[2] == width):
        return t
    return t.reshape(-1, nblk, width)


def _collapsible(t: torch.Tensor) -> bool:
    """Whether the leading dimensions of `t` (all but the last) collapse into one row dimension, so
    that the launchers can read `t` flat with one row stride. (A contiguous tensor's always do:
    that is asked first, in C.)"""
    if t.dim() <= 2 or t.is_contiguous():
        return True
    dims = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True) if size != 1]
    return all(outer == inner * size for (_, outer), (size, inner) in zip(dims, dims[1:], strict=False))


def _plain_scale(scale: torch.Tensor | None) -> torch.Tensor | None:
    """A scale with leading unit dimensions (S as (1, nblk, N)) as the op's (nblk, N)."""
    return scale if scale is None or scale.dim() == 2 else scale.reshape(scale.shape[-2:])


def block_diag_matmul_unchecked(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, scale_rows: bool
) -> torch.Tensor:
    """`block_diag_matmul` for callers whose shapes are right by construction (the autograd
    Functions): no validation, the custom op only where `dispatch_free` would ask for it.

    It also takes what a layer holds, so that the hot path makes no view of its own: x flat as
    (T, nblk*K) (y is then (T, nblk*N)), and a scale with leading unit dimensions (S's (1, nblk, N));
    the Triton launcher reads both through their strides."""
    route = _route(x, w, scale)
    nblk = w.shape[0]
    blocked = x.dim() == 3 and x.shape[1] == nblk and x.shape[2] == w.shape[1]
    if route == _VIA_TRITON:
        if blocked or x.dim() == 2 or _collapsible(x):
            return launchers.triton_block_diag_matmul(x, w, scale, scale_rows)
        y = launchers.triton_block_diag_matmul(x.reshape(-1, x.shape[-1]), w, scale, scale_rows)
        return y.reshape(*x.shape[:-1], nblk * w.shape[2])
    x3, scale2 = _blocked(x, nblk, w.shape[1]), _plain_scale(scale)
    if route == _VIA_TORCH:
        y = block_diag.torch_block_diag_matmul(x3, w, scale2, scale_rows)
    else:
        y = _block_diag_matmul_op(x3, w, scale2, scale_rows)
    return y if blocked else y.reshape(*x.shape[:-1], nblk * w.shape[2])


def block_diag_matmul_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    compute_grad_x: bool = True,
    compute_grad_w: bool = True,
    compute_grad_scale: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """K3: `(grad_out @ (w * scale)^T, G * scale, sum over K of G * w)` per block, with
    `G = x^T @ grad_out` reduced over T in a fixed order and kept in fp32 until the products;
    `grad_w` comes back in w's dtype, `grad_scale` in scale's. A skipped output is None."""
    nblk, k, n = w.shape
    if grad_out.dim() != 3 or tuple(grad_out.shape[1:]) != (nblk, n):
        raise ValueError(f"block_diag_matmul_backward: expected grad_out (T, {nblk}, {n}), got {tuple(grad_out.shape)}")
    if compute_grad_w or compute_grad_scale:
        if x is None:
            raise ValueError("block_diag_matmul_backward: the block gradients need the forward input x")
        _check(x, w, scale, n, "block_diag_matmul_backward")
    if compute_grad_scale and scale is None:
        raise ValueError("block_diag_matmul_backward: compute_grad_scale needs the scale")
    return block_diag_backward_unchecked(grad_out, x, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale)


def block_diag_backward_unchecked(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    compute_grad_x: bool,
    compute_grad_w: bool,
    compute_grad_scale: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`block_diag_matmul_backward` for callers whose shapes are right by construction; like
    `block_diag_matmul_unchecked`, it takes flat activations (dx is then flat) and a scale with
    leading unit dimensions (dscale then has the scale's shape)."""
    route = _route(grad_out, w, scale, x)
    nblk = w.shape[0]
    blocked = grad_out.dim() == 3 and grad_out.shape[1] == nblk and grad_out.shape[2] == w.shape[2]
    if route == _VIA_TRITON and w.shape[2] <= autotuning.MAX_FUSED_N:
        if blocked or ((grad_out.is_contiguous() or _collapsible(grad_out))
                       and (x is None or x.is_contiguous() or _collapsible(x))):  # fmt: skip
            return launchers.triton_block_diag_backward(
                grad_out, x, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale
            )
        lead = grad_out.shape[:-1]
        x2 = None if x is None else x.reshape(-1, x.shape[-1])
        dx, dw, ds = launchers.triton_block_diag_backward(
            grad_out.reshape(-1, grad_out.shape[-1]), x2, w, scale, compute_grad_x, compute_grad_w, compute_grad_scale
        )
        return (None if dx is None else dx.reshape(*lead, dx.shape[-1])), dw, ds
    g3, x3, scale2 = _blocked(grad_out, nblk, w.shape[2]), _blocked(x, nblk, w.shape[1]), _plain_scale(scale)
    if route != _VIA_OP:
        dx, dw, ds = _block_diag_backward_impl(g3, x3, w, scale2, compute_grad_x, compute_grad_w, compute_grad_scale)
    else:
        dx, dw, ds = _block_diag_backward_op(g3, x3, w, scale2, compute_grad_x, compute_grad_w, compute_grad_scale)
        # The op returns empty tensors for skipped outputs (custom ops cannot return None).
        dx, dw, ds = (
            (dx if compute_grad_x else None),
            (dw if compute_grad_w else None),
            (ds if compute_grad_scale else None),
        )
    if dx is not None and not blocked:
        dx = dx.reshape(*grad_out.shape[:-1], nblk * w.shape[1])
    if ds is not None and scale.dim() != 2:
        ds = ds.reshape(scale.shape)
    return dx, dw, ds


def _segmented_block_transform_impl(x, maps, rows, group_offsets, group_slots, largest_group):
    if _triton_path(x, maps, None):
        return launchers.triton_segmented_block_transform(x, maps, rows, group_offsets, group_slots, largest_group)
    return block_diag.torch_segmented_block_transform(x, maps, rows, group_offsets, group_slots)


@torch.library.custom_op("fura_kernels::segmented_block_transform", mutates_args=())
def _segmented_block_transform_op(
    x: torch.Tensor,
    maps: torch.Tensor,
    rows: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    largest_group: int,
) -> torch.Tensor:
    return _segmented_block_transform_impl(x, maps, rows, group_offsets, group_slots, largest_group)


@_segmented_block_transform_op.register_fake
def _(x, maps, rows, group_offsets, group_slots, largest_group):
    return x.new_empty(x.shape)


def segmented_block_transform(
    x: torch.Tensor,
    maps: torch.Tensor,
    rows: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    largest_group: int,
) -> torch.Tensor:
    """Many adapters' block-diagonal maps over one batch, in one launch (no autograd: serving).

    `y[t, j] = x[t, j] @ maps[group_slots[g], j]` for every row `t` that group `g` owns, and
    `y[t] = x[t]` where `group_slots[g] == -1` (no adapter). x (T, nblk, k) float, any strides;
    maps (A, nblk, k, k) any float dtype (read as stored, cast to x's dtype at the dot); rows (T,)
    int32, the rows of x grouped by group, each row once; group_offsets (G + 1,) int32, where
    group `g`'s rows start in `rows`; group_slots (G,) int32, in [-1, A); largest_group, the
    most rows a group has (a host int: it sizes the launch grid). Returns (T, nblk, k) in x's
    dtype."""
    op = "segmented_block_transform"
    if x.dim() != 3 or maps.dim() != 4 or tuple(maps.shape[1:]) != (x.shape[1], x.shape[2], x.shape[2]):
        raise ValueError(
            f"{op}: expected x (T, nblk, k) and maps (A, nblk, k, k), got {tuple(x.shape)} and {tuple(maps.shape)}"
        )
    if not (x.dtype.is_floating_point and maps.dtype.is_floating_point):
        raise TypeError(f"{op}: expected floating x and maps, got {x.dtype} and {maps.dtype}")
    routing = {"rows": rows, "group_offsets": group_offsets, "group_slots": group_slots}
    for name, tensor in routing.items():
        if tensor.dtype != torch.int32 or tensor.dim() != 1:
            raise TypeError(f"{op}: {name} must be a 1-D int32 tensor, got {tensor.dtype} {tuple(tensor.shape)}")
        if tensor.device != x.device or maps.device != x.device:
            raise ValueError(f"{op}: x is on {x.device} but {name} on {tensor.device} and maps on {maps.device}")
    if rows.shape[0] != x.shape[0] or group_offsets.shape[0] != group_slots.shape[0] + 1:
        raise ValueError(
            f"{op}: {x.shape[0]} tokens need {x.shape[0]} rows and G + 1 offsets for G slots; got {rows.shape[0]} "
            f"rows, {group_offsets.shape[0]} offsets, {group_slots.shape[0]} slots"
        )
    if dispatch_free(x, maps):
        return _segmented_block_transform_impl(x, maps, rows, group_offsets, group_slots, largest_group)
    return _segmented_block_transform_op(x, maps, rows, group_offsets, group_slots, largest_group)


# FLOP formulas, so `torch.utils.flop_counter.FlopCounterMode` (and the benchmarks and tests
# built on it) count the custom ops like the matmuls they are.
@register_flop_formula(torch.ops.fura_kernels.block_diag_matmul)
def _block_diag_matmul_flops(x_shape, w_shape, *args, **kwargs) -> int:
    tokens, nblk, k = x_shape
    return 2 * tokens * nblk * k * w_shape[2]


@register_flop_formula(torch.ops.fura_kernels.block_diag_backward)
def _block_diag_backward_flops(
    grad_shape, x_shape, w_shape, scale_shape, compute_grad_x, compute_grad_w, compute_grad_scale, *args, **kwargs
) -> int:
    tokens, nblk, n = grad_shape
    per_product = 2 * tokens * nblk * w_shape[1] * n
    return per_product * (int(compute_grad_x) + int(compute_grad_w or compute_grad_scale))


__all__ = [
    "accumulate_dtype",
    "block_diag_backward_unchecked",
    "block_diag_matmul",
    "block_diag_matmul_backward",
    "block_diag_matmul_unchecked",
    "segmented_block_transform",
    "use_triton",
]
