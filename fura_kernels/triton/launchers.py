"""Python launchers for K1 and K3: tensors in, tensors out (no autograd state here).

Same contracts as the PyTorch implementations in `block_diag.py`, which remain the CPU path
and the reference fallback. Shapes are validated once, by the public ops in `ops.py`; these
launchers trust them.

The eager hot path does as little as it can on the host: the autotuner runs once per key
(T bucket, sizes, dtypes, flags, device) and its choice is cached here, so later calls launch
the kernel with that config directly, and K3's block counters live in one zeroed buffer per
device and stream (the kernel leaves them at zero), so no launch clears them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import triton

from . import autotuning as at
from .kernels import (
    SCALE_COLS,
    SCALE_NONE,
    SCALE_ROWS,
    block_diag_backward_kernel,
    block_diag_matmul_kernel,
    segmented_block_transform_kernel,
)

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_k1_tuned = triton.autotune(
    configs=at.K1_CONFIGS,
    key=["t_bucket", "K", "N"],
    prune_configs_by={"early_config_prune": at.prune_k1},
)(block_diag_matmul_kernel)

_k3_tuned = triton.autotune(
    configs=at.K3_CONFIGS,
    key=["t_bucket", "K", "N", "COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DS", "HAS_SCALE"],
    prune_configs_by={"early_config_prune": at.prune_k3},
)(block_diag_backward_kernel)

# Tuned config per launch key: the autotuner is consulted once per key, then bypassed.
_K1_CHOICE: dict[tuple, triton.Config] = {}
_K3_CHOICE: dict[tuple, triton.Config] = {}
# K3's per-block arrival counters, one int32 buffer per (device, stream), grown as needed.
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _launch(tuned, kernel, choices: dict, key: tuple, grid, args: tuple, meta: dict) -> None:
    if at.INTERPRET:
        kernel[grid](*args, **meta)
        return
    config = choices.get(key)
    if config is None:
        tuned[grid](*args, **meta)
        choices[key] = tuned.best_config
        return
    kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def persistent_buffer(device: torch.device, make: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
    """`make()`, a buffer the caller caches across calls, allocated where no CUDA-graph memory
    pool can claim it.

    Inductor's CUDA-graph trees (`torch.compile(mode="reduce-overhead")`) send every allocation
    of the thread that warms up or records a graph into the tree's private pool, and later hand
    that pool's memory to other graphs' tensors: a cache allocated there would be overwritten.
    The allocator routes to a pool by thread, so a short-lived thread of our own allocates from
    the ordinary pool; it finishes its work before the caller goes on. During a capture no
    cache may be created at all (the caller must keep such buffers per call, or warm up first).
    """
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"fura_kernels: the {what} was first needed during CUDA-graph capture; run one eager "
                           "step before capturing (as torch.cuda.graph's documentation asks)")  # fmt: skip
    made: list = []

    def allocate() -> None:
        try:
            with torch.cuda.device(device):
                made.append(make())
                torch.cuda.current_stream(device).synchronize()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread
            made.append(err)

    worker = threading.Thread(target=allocate, name="fura-kernels-persistent-buffer")
    worker.start()
    worker.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def counters_for(nblk: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for K3's blocks. Cached per device and stream (the kernel resets
    what it uses) and allocated outside any CUDA-graph pool (`persistent_buffer`), except while a
    CUDA graph is being captured: the graph then records its own zeroing, so no buffer from its
    private pool leaks into later eager calls."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(nblk, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < nblk:
        size = max(nblk, 256)
        buffer = persistent_buffer(device, lambda: torch.zeros(size, dtype=torch.int32, device=device), "K3 counters")
        _COUNTERS[key] = buffer
    return buffer


def triton_block_diag_matmul(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, scale_rows: bool = False
) -> torch.Tensor:
    """K1: `y[:, j] = x[:, j] @ (w[j] * scale[j])`. x (T, nblk, K) any strides, w (nblk, K, N)
    any strides and float dtype, scale (nblk, K) with `scale_rows` else (nblk, N), or None."""
    tokens, nblk, k = x.shape
    n = w.shape[2]
    y = torch.empty((tokens, nblk, n), dtype=x.dtype, device=x.device)
    if tokens == 0 or nblk == 0 or n == 0:
        return y
    mode = SCALE_NONE if scale is None else (SCALE_ROWS if scale_rows else SCALE_COLS)
    s = scale if scale is not None else w
    s_strides = scale.stride() if scale is not None else (0, 0)
    bucket = at.t_bucket(tokens)
    args = (x, w, s, y, tokens, k, n, *x.stride(), *w.stride(), *s_strides, *y.stride(), bucket)
    meta = dict(SCALE=mode, UPCAST=at.INTERPRET, INPUT_PRECISION=at.input_precision(x.dtype))
    if at.INTERPRET:
        meta.update(at.K1_INTERPRET_META)

    def grid(m):
        return (triton.cdiv(tokens, m["BLOCK_T"]), nblk, triton.cdiv(n, m["BLOCK_N"]))

    key = (bucket, k, n, x.dtype, w.dtype, s.dtype, mode, x.device)
    _launch(_k1_tuned, block_diag_matmul_kernel, _K1_CHOICE, key, grid, args, meta)
    return y


def triton_block_diag_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    compute_grad_x: bool = True,
    compute_grad_w: bool = True,
    compute_grad_scale: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """K3 in one launch: `dx = grad_out @ (w * scale)^T`, `dw = G * scale`, `dscale = sum over K
    of G * w` per block, `G = x^T grad_out` reduced over T in a fixed order (see the kernel).
    Needs `w.shape[2] <= MAX_FUSED_N` (see `autotuning`)."""
    tokens, nblk, n = grad_out.shape
    k = w.shape[1]
    device = grad_out.device
    need_g = compute_grad_w or compute_grad_scale
    grad_x = torch.empty((tokens, nblk, k), dtype=grad_out.dtype, device=device) if compute_grad_x else None
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=device) if compute_grad_w else None
    grad_s = torch.empty((nblk, n), dtype=scale.dtype, device=device) if compute_grad_scale else None
    if not (compute_grad_x or need_g):
        return None, None, None
    if tokens == 0:  # no rows: the block gradients are sums of nothing
        for grad in (grad_w, grad_s):
            if grad is not None:
                grad.zero_()
        return grad_x, grad_w, grad_s
    rows_per_split, n_splits = at.split_rows(tokens, nblk)
    partial = torch.empty((n_splits, nblk, k, n), dtype=torch.float32, device=device) if need_g else None
    counters = counters_for(nblk, device) if need_g else None
    # Unused operands get a placeholder pointer; the constexpr flags compile their code away.
    placeholder = grad_out
    bucket = at.t_bucket(tokens)
    args = (
        grad_out, x if x is not None else placeholder, w, scale if scale is not None else placeholder,
        grad_x if grad_x is not None else placeholder, grad_w if grad_w is not None else placeholder,
        grad_s if grad_s is not None else placeholder, partial if partial is not None else placeholder,
        counters if counters is not None else placeholder,
        tokens, k, n, rows_per_split, n_splits,
        *grad_out.stride(), *(x.stride() if x is not None else (0, 0, 0)), *w.stride(),
        *(scale.stride() if scale is not None else (0, 0)), *(grad_x.stride() if grad_x is not None else (0, 0, 0)),
        *(grad_w.stride() if grad_w is not None else (0, 0, 0)), *(grad_s.stride() if grad_s is not None else (0, 0)),
        *(partial.stride()[:3] if partial is not None else (0, 0, 0)),
        bucket,
    )  # fmt: skip
    flags = dict(COMPUTE_DX=compute_grad_x, COMPUTE_DW=compute_grad_w, COMPUTE_DS=compute_grad_scale,
                 HAS_SCALE=scale is not None)  # fmt: skip
    meta = dict(
        BLOCK_N=at.tile_cap(n), **flags, UPCAST=at.INTERPRET, INPUT_PRECISION=at.input_precision(grad_out.dtype)
    )
    if at.INTERPRET:
        meta.update(at.K3_INTERPRET_META)

    def grid(m):
        return (n_splits, nblk, triton.cdiv(k, m["BLOCK_K"]))

    key = (bucket, k, n, grad_out.dtype, w.dtype, *flags.values(), device)
    _launch(_k3_tuned, block_diag_backward_kernel, _K3_CHOICE, key, grid, args, meta)
    return grad_x, grad_w, grad_s


# The segmented transform's tiles. It reads each token's block once and its adapter's b x b map
# once per row tile, so the row tile follows the largest group (a decode batch spread over many
# adapters has a few tokens per group: a 64-row tile would be mostly masked) and the column tile
# covers a whole block up to b = 128 (x is then read once). 4 warps hold a 64 x 128 fp32
# accumulator in 64 registers a thread.
SEGMENT_MAX_ROWS = 64
SEGMENT_MAX_COLS = 128
SEGMENT_K_TILE = 64
SEGMENT_WARPS = 4
# Under the interpreter: tiles narrower than a block and fewer rows than a group, so the tests
# at small sizes cross every tile edge.
SEGMENT_INTERPRET_TILE = 16


def segment_tiles(largest_group: int, k: int) -> dict:
    """BLOCK_T / BLOCK_K / BLOCK_N of the segmented transform for a batch whose largest group
    holds `largest_group` tokens, with blocks `k` wide."""
    if at.INTERPRET:
        side = SEGMENT_INTERPRET_TILE
        return dict(BLOCK_T=side, BLOCK_K=side, BLOCK_N=side)
    return dict(
        BLOCK_T=min(SEGMENT_MAX_ROWS, at.tile_cap(largest_group)),
        BLOCK_K=min(SEGMENT_K_TILE, at.tile_cap(k)),
        BLOCK_N=min(SEGMENT_MAX_COLS, at.tile_cap(k)),
    )


def triton_segmented_block_transform(
    x: torch.Tensor,
    maps: torch.Tensor,
    rows: torch.Tensor,
    group_offsets: torch.Tensor,
    group_slots: torch.Tensor,
    largest_group: int,
) -> torch.Tensor:
    """`y[t, j] = x[t, j] @ maps[slot(t), j]` (or `x[t, j]` for slot -1) in one launch; see
    `segmented_block_transform_kernel`. x (T, nblk, K) any strides; maps (A, nblk, K, K)."""
    tokens, nblk, k = x.shape
    y = torch.empty((tokens, nblk, k), dtype=x.dtype, device=x.device)
    groups = group_slots.shape[0]
    if tokens == 0 or nblk == 0 or k == 0 or groups == 0 or largest_group == 0:
        return y
    tiles = segment_tiles(largest_group, k)
    grid = (groups, triton.cdiv(largest_group, tiles["BLOCK_T"]), nblk * triton.cdiv(k, tiles["BLOCK_N"]))
    segmented_block_transform_kernel[grid](
        x, maps, y, rows, group_offsets, group_slots, k, *x.stride(), *maps.stride(), *y.stride(),
        **tiles, UPCAST=at.INTERPRET, INPUT_PRECISION=at.input_precision(x.dtype), num_warps=SEGMENT_WARPS,
    )  # fmt: skip
    return y
