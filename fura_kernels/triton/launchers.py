"""Python launchers for K1, K3 and the segmented transform: tensors in, tensors out (no
autograd state here).

Same contracts as the PyTorch implementations in `block_diag.py`, which remain the CPU path
and the reference fallback. Shapes are validated once, by the public ops in `ops.py`; these
launchers trust them.

The eager hot path does as little as it can on the host. Each launcher keys its calls on what can
change between them (token count, strides, dtypes, device, input alignment) and keeps a launch
plan per key (`plans.KernelPlan`): the compiled binary, its grid and every scalar argument, so a
repeated launch is one dictionary lookup and one call of Triton's launcher. A new key goes
through Triton once: the autotuner on a GPU (once per T bucket and shape, as before), the first
config the pruner keeps in launch-only mode, the interpreter's fixed tiles under
`TRITON_INTERPRET=1` (which keeps no plans: there is no binary). K3's block counters live in one
zeroed buffer per device and stream (the kernel leaves them at zero), so no launch clears them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import triton
from triton.runtime import driver

from . import autotuning as at
from .kernels import (
    SCALE_COLS,
    SCALE_NONE,
    SCALE_ROWS,
    block_diag_backward_kernel,
    block_diag_matmul_kernel,
    segmented_block_transform_kernel,
)
from .launch_only import ENABLED as LAUNCH_ONLY
from .plans import INTERPRET, capability, cdiv, first_launch, keep_plan, plan_table

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

# Launch plans by key, one table per kernel (see the module docstring).
_K1_PLANS: dict[tuple, object] = plan_table()
_K3_PLANS: dict[tuple, object] = plan_table()
_SEGMENT_PLANS: dict[tuple, object] = plan_table()
# K3's per-block arrival counters and fp32 partial sums, one pair per (device, stream), grown as
# needed (`k3_scratch`).
_K3_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


# What torch.backends.cuda.matmul.allow_tf32 reads, as a C call: the hot path asks per fp32 launch.
_allow_tf32 = torch._C._get_cublas_allow_tf32


def _precision(dtype: torch.dtype) -> str:
    """The dots' input precision, read per call for fp32 (it follows torch's TF32 switch, which a
    user may flip between calls); half-precision dots are always "ieee". A key holds it. (The hot
    path inlines it: `"ieee" if dtype is not torch.float32 or not _allow_tf32() else at.input_precision(dtype)`.)"""
    return at.input_precision(dtype) if dtype is torch.float32 else "ieee"


def _first_tuned_launch(plans, key, tuned, kernel, grid_of, tensors, scalars, meta, select, derived=()) -> None:
    """A tuned kernel's first launch for `key`, and its plan.

    GPU: the autotuner launches it (benchmarking once per tuning key, then reusing its choice)
    and the plan keeps the binary of the config it ran. Launch-only mode: the first config the
    pruner keeps (`select()`), as no benchmark can run. Interpreter: its fixed small tiles."""
    if INTERPRET:
        first_launch(plans, key, kernel, grid_of(meta), tensors, scalars, meta, {})
        return
    if LAUNCH_ONLY:
        config = select()[0]
        constexprs = {**meta, **config.kwargs}
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        first_launch(plans, key, kernel, grid_of(constexprs), tensors, scalars, constexprs, options, derived)
        return
    compiled = tuned[grid_of](*tensors, *scalars, **meta)
    constexprs = {**meta, **tuned.best_config.kwargs}
    keep_plan(plans, key, compiled, kernel, grid_of(constexprs), tensors, scalars, constexprs, derived)


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


def persistent_or_fresh(make: Callable[[], torch.Tensor], device: torch.device, what: str) -> torch.Tensor:
    """`make()` for a buffer kept across calls: outside any CUDA-graph pool on a GPU (see
    `persistent_buffer`), as it is on the CPU (launch-only mode)."""
    return persistent_buffer(device, make, what) if device.type == "cuda" else make()


def _fresh_k3_scratch(nblk: int, partial_numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(nblk, dtype=torch.int32, device=device),
            torch.empty(partial_numel, dtype=torch.float32, device=device))  # fmt: skip


def k3_scratch(nblk: int, partial_numel: int, device: torch.device, stream=None) -> tuple[torch.Tensor, torch.Tensor]:
    """K3's per-block arrival counters (zeroed: the kernel leaves them at zero) and its flat fp32
    partial sums (written and reduced inside one launch, so launches on one stream share them), one
    pair per device and stream, grown as needed and allocated outside any CUDA-graph pool, except
    while a CUDA graph is being captured: the graph then gets its own (and records the zeroing), so
    no buffer from its private pool leaks into later eager calls. Under the interpreter: fresh
    buffers each call. `stream`: the current stream, where the caller has it already."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return _fresh_k3_scratch(nblk, partial_numel, device)
    elif not LAUNCH_ONLY:
        return _fresh_k3_scratch(nblk, partial_numel, device)
    if stream is None:
        stream = driver.active.get_current_stream(device.index or 0)
    key = (device, stream)
    scratch = _K3_SCRATCH.get(key)
    if scratch is not None and scratch[0].numel() >= nblk and scratch[1].numel() >= partial_numel:
        return scratch
    counters, partials = scratch if scratch is not None else (None, None)
    if counters is None or counters.numel() < nblk:
        size = max(nblk, 256)
        counters = persistent_or_fresh(lambda: torch.zeros(size, dtype=torch.int32, device=device), device,
                                       "K3 counters")  # fmt: skip
    if partials is None or partials.numel() < partial_numel:
        size = max(partial_numel, 1 << 16)
        partials = persistent_or_fresh(lambda: torch.empty(size, dtype=torch.float32, device=device), device,
                                       "K3 partial sums")  # fmt: skip
    scratch = _K3_SCRATCH[key] = (counters, partials)
    return scratch


def counters_for(nblk: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters of `nblk` blocks on the current stream (see `k3_scratch`)."""
    return k3_scratch(nblk, 0, device)[0]


def is_blocked(t: torch.Tensor, width: int) -> bool:
    """Whether activations `t` come blocked, (T, nblk, width), rather than flat, (..., nblk*width).
    (Unambiguous with several blocks: a flat tensor's last dimension is nblk*width, not width.)"""
    return t.dim() == 3 and t.shape[2] == width


def _blocked_strides(t: torch.Tensor, nblk: int, width: int) -> tuple[int, int, int]:
    """(row, block, column) strides of activations `t`: blocked (T, nblk, width), or flat
    (..., nblk*width) with leading dimensions that collapse into one (the ops see to it), whose
    block view is a view of the same memory."""
    if is_blocked(t, width):
        return t.stride()
    strides = t.stride()
    # The row stride: the innermost leading dimension's that is not of size 1 (a size-1 dimension's
    # stride is any number).
    leading = zip(reversed(t.shape[:-1]), reversed(strides[:-1]), strict=True)
    row = next((stride for size, stride in leading if size != 1), strides[-2])
    return row, width * strides[-1], strides[-1]


def _scale_strides(scale: torch.Tensor) -> tuple[int, int]:
    """A per-block scale's (block, value) strides: (nblk, N), or a parameter with leading unit
    dimensions such as S's (1, nblk, N)."""
    return scale.stride()[-2:]


def triton_block_diag_matmul(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, scale_rows: bool = False
) -> torch.Tensor:
    """K1: `y[:, j] = x[:, j] @ (w[j] * scale[j])`. x (T, nblk, K), or flat (..., nblk*K) whose leading
    dimensions collapse into one, any strides; w (nblk, K, N) any strides and float dtype; scale
    (nblk, K) with `scale_rows` else (nblk, N), optionally with leading unit dimensions, or None.
    y (T, nblk, N), or (..., nblk*N) for flat x."""
    nblk, k, n = w.shape
    blocked = is_blocked(x, k)
    if k == n and x.is_contiguous():  # square blocks (full rank): y is laid out as x
        y = torch.empty_like(x)
    else:
        y = x.new_empty((x.shape[0], nblk, n) if blocked else (*x.shape[:-1], nblk * n))
    tokens = x.shape[0] if blocked or x.dim() == 2 else x.numel() // (nblk * k)
    if tokens == 0 or nblk == 0 or n == 0:
        return y
    s = w if scale is None else scale
    dtype = x.dtype
    precision = "ieee" if dtype is not torch.float32 or not _allow_tf32() else at.input_precision(dtype)
    key = (x.shape, x.stride(), w.shape, w.stride(), None if scale is None else scale.stride(), scale_rows,
           dtype, w.dtype, s.dtype, precision, x.device, x.data_ptr() & 15, w.data_ptr() & 15,
           s.data_ptr() & 15)  # fmt: skip
    plan = _K1_PLANS.get(key)
    if plan is not None:
        plan(x, w, s, y)
        return y
    mode = SCALE_NONE if scale is None else (SCALE_ROWS if scale_rows else SCALE_COLS)
    s_strides = _scale_strides(scale) if scale is not None else (0, 0)
    bucket = at.t_bucket(tokens)
    scalars = (tokens, k, n, *_blocked_strides(x, nblk, k), *w.stride(), *s_strides, *_blocked_strides(y, nblk, n),
               bucket)  # fmt: skip
    meta = dict(SCALE=mode, UPCAST=INTERPRET, INPUT_PRECISION=_precision(x.dtype))
    if INTERPRET:
        meta.update(at.K1_INTERPRET_META)

    def grid(m):
        return (cdiv(tokens, m["BLOCK_T"]), nblk, cdiv(n, m["BLOCK_N"]))

    def select():
        return at.select_k1(at.K1_CONFIGS, k, n, bucket, x.element_size(), capability(x.device))

    _first_tuned_launch(_K1_PLANS, key, _k1_tuned, block_diag_matmul_kernel, grid, (x, w, s, y), scalars, meta,
                        select)  # fmt: skip
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
    grad_out (T, nblk, N) or flat (..., nblk*N) (leading dimensions collapsing into one), x likewise
    with K (or None), w (nblk, K, N), scale as for K1; dx has grad_out's layout, dscale scale's
    shape. Needs `N <= MAX_FUSED_N` (see
    `autotuning`)."""
    nblk, k, n = w.shape
    blocked = is_blocked(grad_out, n)
    tokens = grad_out.shape[0] if blocked or grad_out.dim() == 2 else grad_out.numel() // (nblk * n)
    device = grad_out.device
    need_g = compute_grad_w or compute_grad_scale
    grad_x = None
    if compute_grad_x:
        # (empty_like where it gives the layout wanted: it costs a third less host time than new_empty)
        if x is not None and x.shape[:-1] == grad_out.shape[:-1] and x.dtype == grad_out.dtype and x.is_contiguous():
            grad_x = torch.empty_like(x)
        else:
            grad_x = grad_out.new_empty((tokens, nblk, k) if blocked else (*grad_out.shape[:-1], nblk * k))
    grad_w = None
    if compute_grad_w:
        grad_w = torch.empty_like(w) if w.is_contiguous() else w.new_empty((nblk, k, n))
    grad_s = None
    if compute_grad_scale:
        grad_s = torch.empty_like(scale) if scale.is_contiguous() else scale.new_empty(scale.shape)
    if not (compute_grad_x or need_g):
        return None, None, None
    if tokens == 0:  # no rows: the block gradients are sums of nothing
        for grad in (grad_w, grad_s):
            if grad is not None:
                grad.zero_()
        return grad_x, grad_w, grad_s
    # Unused operands get a placeholder pointer; the constexpr flags compile their code away.
    xp = x if x is not None else grad_out
    sp = scale if scale is not None else grad_out
    dtype = grad_out.dtype
    precision = "ieee" if dtype is not torch.float32 or not _allow_tf32() else at.input_precision(dtype)
    key = (grad_out.shape, grad_out.stride(), None if x is None else (x.shape, x.stride()), w.shape, w.stride(),
           None if scale is None else (scale.shape, scale.stride()), compute_grad_x, compute_grad_w,
           compute_grad_scale, dtype, xp.dtype, w.dtype, sp.dtype, precision, device, grad_out.data_ptr() & 15,
           xp.data_ptr() & 15, w.data_ptr() & 15, sp.data_ptr() & 15)  # fmt: skip
    plan = _K3_PLANS.get(key)
    if plan is not None:
        rows_per_split, n_splits = plan.derived
        stream = plan.stream_of(plan.device_index)
    else:
        rows_per_split, n_splits = at.split_rows(tokens, nblk)
        stream = None
    counters, partial = k3_scratch(nblk, n_splits * nblk * k * n, device, stream) if need_g else (grad_out, grad_out)
    tensors = (grad_out, xp, w, sp, grad_x if grad_x is not None else grad_out,
               grad_w if grad_w is not None else grad_out, grad_s if grad_s is not None else grad_out, partial,
               counters)  # fmt: skip
    if plan is not None:
        plan.on(stream, *tensors)
        return grad_x, grad_w, grad_s
    bucket = at.t_bucket(tokens)
    scalars = (
        tokens, k, n, rows_per_split, n_splits,
        *_blocked_strides(grad_out, nblk, n), *(_blocked_strides(x, nblk, k) if x is not None else (0, 0, 0)),
        *w.stride(), *(_scale_strides(scale) if scale is not None else (0, 0)),
        *(_blocked_strides(grad_x, nblk, k) if grad_x is not None else (0, 0, 0)),
        *(grad_w.stride() if grad_w is not None else (0, 0, 0)),
        *(_scale_strides(grad_s) if grad_s is not None else (0, 0)),
        *((nblk * k * n, k * n, n) if need_g else (0, 0, 0)),  # partials (n_splits, nblk, K, N) in the flat buffer
        bucket,
    )  # fmt: skip
    flags = dict(COMPUTE_DX=compute_grad_x, COMPUTE_DW=compute_grad_w, COMPUTE_DS=compute_grad_scale,
                 HAS_SCALE=scale is not None)  # fmt: skip
    block_n = at.tile_cap(n)
    meta = dict(BLOCK_N=block_n, **flags, UPCAST=INTERPRET, INPUT_PRECISION=_precision(grad_out.dtype))
    if INTERPRET:
        meta.update(at.K3_INTERPRET_META)

    def grid(m):
        return (n_splits, nblk, cdiv(k, m["BLOCK_K"]))

    def select():
        return at.select_k3(at.K3_CONFIGS, k, block_n, bucket, grad_out.element_size(), capability(device))

    _first_tuned_launch(_K3_PLANS, key, _k3_tuned, block_diag_backward_kernel, grid, tensors, scalars, meta, select,
                        (rows_per_split, n_splits))  # fmt: skip
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
    if INTERPRET:
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
    tensors = (x, maps, y, rows, group_offsets, group_slots)
    key = (x.shape, x.stride(), maps.shape, maps.stride(), groups, largest_group, x.dtype, maps.dtype,
           _precision(x.dtype), x.device, x.data_ptr() & 15, maps.data_ptr() & 15, rows.data_ptr() & 15,
           group_offsets.data_ptr() & 15, group_slots.data_ptr() & 15)  # fmt: skip
    plan = _SEGMENT_PLANS.get(key)
    if plan is not None:
        plan(*tensors)
        return y
    tiles = segment_tiles(largest_group, k)
    grid = (groups, cdiv(largest_group, tiles["BLOCK_T"]), nblk * cdiv(k, tiles["BLOCK_N"]))
    constexprs = dict(**tiles, UPCAST=INTERPRET, INPUT_PRECISION=_precision(x.dtype))
    scalars = (k, *x.stride(), *maps.stride(), *y.stride())
    first_launch(_SEGMENT_PLANS, key, segmented_block_transform_kernel, grid, tensors, scalars, constexprs,
                 dict(num_warps=SEGMENT_WARPS))  # fmt: skip
    return y
