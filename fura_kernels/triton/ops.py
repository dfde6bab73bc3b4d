"""K1 and K3 as `torch.library` custom ops, dispatching to Triton or to PyTorch.

Registered ops (namespace `fura_kernels`) have fake implementations, so a model built from
`FusedBTTLinear` compiles under `torch.compile(fullgraph=True)` without a graph break. Each op
runs the Triton kernel on CUDA for fp16/bf16/fp32 (and on the CPU under `TRITON_INTERPRET=1`,
which is how CI tests the kernels), and the PyTorch implementation otherwise. Set
`FURA_DISABLE_TRITON=1` to force the PyTorch path, for debugging.
"""

from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from . import block_diag
from .block_diag import accumulate_dtype

try:
    from . import autotuning, launchers
except ImportError:  # triton is not installed (it ships for Linux only): the PyTorch path remains
    autotuning = launchers = None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve a tensor like `t`."""
    if launchers is None or os.environ.get("FURA_DISABLE_TRITON") == "1":
        return False
    if t.dtype not in launchers.TRITON_DTYPES:
        return False
    if autotuning.INTERPRET:
        return t.device.type == "cpu"
    return t.device.type == "cuda"


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _dispatch_free(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may skip the custom op's dispatcher round trip and run its body directly.

    The round trip costs about 8 µs a call on the CPU path of this project's machine (15 µs
    against 7.5 µs for a small K1), several times per layer step, and a training step's host
    time is what a GPU waits on at small T. Only eager calls on plain tensors skip it:
    torch.compile, fake tensors and dispatch modes such as FlopCounterMode must see the op.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    # Parameters count as plain: they override no torch function. Subclasses (FakeTensor,
    # DTensor, ...) may, so they keep the op.
    return all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors if t is not None)


def _block_diag_matmul_impl(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if use_triton(x) and w.dtype == x.dtype:
        return launchers.triton_block_diag_matmul(x, w)
    return block_diag.torch_block_diag_matmul(x, w)


@torch.library.custom_op("fura_kernels::block_diag_matmul", mutates_args=())
def _block_diag_matmul_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _block_diag_matmul_impl(x, w)


@_block_diag_matmul_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], w.shape[2]))


def _block_diag_backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    compute_grad_x: bool,
    compute_grad_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if use_triton(grad_out) and w.dtype == grad_out.dtype:
        if w.shape[2] <= autotuning.MAX_FUSED_N:
            grad_x, grad_w = launchers.triton_block_diag_backward(grad_out, x, w, compute_grad_x, compute_grad_w)
        else:  # a block too wide for one fused tile: K1 on w^T for dx, PyTorch for G
            grad_x = launchers.triton_block_diag_matmul(grad_out, w.transpose(1, 2)) if compute_grad_x else None
            _, grad_w = block_diag.torch_block_diag_backward(grad_out, x, w, False, compute_grad_w)
    else:
        grad_x, grad_w = block_diag.torch_block_diag_backward(grad_out, x, w, compute_grad_x, compute_grad_w)
    return grad_x, grad_w


@torch.library.custom_op("fura_kernels::block_diag_backward", mutates_args=())
def _block_diag_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    compute_grad_x: bool,
    compute_grad_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_w = _block_diag_backward_impl(grad_out, x, w, compute_grad_x, compute_grad_w)
    # Custom ops return tensors, not None: an empty tensor marks a skipped output.
    empty = grad_out.new_empty(0)
    return (grad_x if grad_x is not None else empty), (grad_w if grad_w is not None else empty)


@_block_diag_backward_op.register_fake
def _(grad_out, x, w, compute_grad_x, compute_grad_w):
    tokens, nblk, _ = grad_out.shape
    grad_x = grad_out.new_empty((tokens, nblk, w.shape[1]) if compute_grad_x else (0,))
    shape = (nblk, w.shape[1], w.shape[2]) if compute_grad_w else (0,)
    return grad_x, grad_out.new_empty(shape, dtype=accumulate_dtype(grad_out.dtype))


def block_diag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """K1: `y[:, j] = x[:, j] @ w[j]`; x (T, nblk, K) any strides, w (nblk, K, N) -> (T, nblk, N)."""
    if _dispatch_free(x, w):
        return _block_diag_matmul_impl(x, w)
    return _block_diag_matmul_op(x, w)


def block_diag_matmul_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    compute_grad_x: bool = True,
    compute_grad_w: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """K3: `(grad_out @ w^T, x^T @ grad_out)` per block; the second in at least fp32, reduced
    over T in a fixed order. A skipped output comes back as None."""
    if _dispatch_free(grad_out, x, w):
        grad_x, grad_w = _block_diag_backward_impl(grad_out, x, w, compute_grad_x, compute_grad_w)
    else:
        grad_x, grad_w = _block_diag_backward_op(grad_out, x, w, compute_grad_x, compute_grad_w)
    return (grad_x if compute_grad_x else None), (grad_w if compute_grad_w else None)


# FLOP formulas, so `torch.utils.flop_counter.FlopCounterMode` (and the benchmarks and tests
# built on it) count the custom ops like the matmuls they are.
@register_flop_formula(torch.ops.fura_kernels.block_diag_matmul)
def _block_diag_matmul_flops(x_shape, w_shape, *args, **kwargs) -> int:
    tokens, nblk, k = x_shape
    return 2 * tokens * nblk * k * w_shape[2]


@register_flop_formula(torch.ops.fura_kernels.block_diag_backward)
def _block_diag_backward_flops(grad_shape, x_shape, w_shape, compute_grad_x, compute_grad_w, *args, **kwargs) -> int:
    tokens, nblk, n = grad_shape
    per_product = 2 * tokens * nblk * w_shape[1] * n
    return per_product * (int(compute_grad_x) + int(compute_grad_w))
