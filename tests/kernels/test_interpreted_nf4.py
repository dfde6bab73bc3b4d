"""NF4 kernels under Triton's CPU interpreter, against bitsandbytes' dequantisation + float64.

Runs in the kernel tier (`TRITON_INTERPRET=1`, `bash .ci/run`); skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings

import pytest
import torch
from torch import nn

from fura_kernels import QFusedBTTLinear, reference
from fura_kernels.nf4 import NF4Tensor, dequantize_nf4
from fura_kernels.triton import use_triton
from fura_kernels.triton.nf4_ops import DECODE_MAX_T, SMALL_T_MAX, nf4_dequantize, nf4_matmul, nf4_path

from ..helpers import DTYPE_IDS, assert_within_rule, check_qfura_layer

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tier: run with TRITON_INTERPRET=1 (bash .ci/run does)"
)
bnb_functional = pytest.importorskip("bitsandbytes.functional")
HALF = [torch.float16, torch.bfloat16]


def _bnb_state(rows, cols, dtype, double_quant):
    w = torch.randn(rows, cols).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return NF4Tensor.from_bnb(packed, state), packed, state


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("shape", [(100, 192), (7, 9), (256, 320)], ids=str)
def test_dequantize_matches_bitsandbytes(shape, double_quant):
    state, packed, bnb_state = _bnb_state(*shape, torch.bfloat16, double_quant)
    assert use_triton(state.packed.float())
    # fp32 output: bit for bit; bitsandbytes computes level * scale in fp32 too.
    ours32 = nf4_dequantize(state, torch.float32)
    assert torch.equal(ours32, dequantize_nf4(state, torch.float32))
    # bf16 output: bit for bit too (the kernel rounds to nearest-even itself, see _round_to).
    assert torch.equal(nf4_dequantize(state, torch.bfloat16), bnb_functional.dequantize_4bit(packed, bnb_state))
    # into a larger shared buffer: only its head is written and returned
    buffer = torch.full((shape[0] * shape[1] + 50,), 7.0)
    view = nf4_dequantize(state, torch.float32, out=buffer)
    assert view.data_ptr() == buffer.data_ptr() and torch.equal(view, ours32) and (buffer[-50:] == 7.0).all()


# (activation dtype, tokens, rows, cols, double quantisation, core dtype) and the directions it
# runs in. The `a @ Lt^T` kernel takes 4 rows a program and 32 * warps scale blocks a step:
# 37 rows end in a partial program; 1152 columns are 18 blocks, one step with a masked tail;
# 6144 are 96, three whole steps (no masks); 320 are 5. The `a @ Lt` kernel takes 32-column
# strips and 128 rows a step: 130 rows make two splits (the second of 2 rows), reduced by the
# last program of each strip.
BOTH, FORWARD, TRANSPOSED = (False, True), (False,), (True,)
DECODE_CASES = [
    ((torch.bfloat16, 1, 37, 1152, True, torch.bfloat16), BOTH),
    ((torch.bfloat16, 2, 130, 320, True, torch.bfloat16), TRANSPOSED),
    ((torch.bfloat16, 1, 6, 6144, True, torch.bfloat16), FORWARD),
    ((torch.float16, 3, 37, 320, True, torch.bfloat16), BOTH),
    ((torch.float32, 2, 21, 1152, False, torch.bfloat16), BOTH),
    ((torch.bfloat16, 4, 9, 320, False, torch.bfloat16), BOTH),
    ((torch.float16, 2, 37, 1152, True, torch.float16), BOTH),
    ((torch.bfloat16, 1, 21, 320, False, torch.float32), BOTH),
]


def _decode_id(case) -> str:
    dtype, tokens, rows, cols, double_quant, core = case
    return f"{DTYPE_IDS[dtype]}-T{tokens}-{rows}x{cols}-dq{int(double_quant)}-core_{DTYPE_IDS[core]}"


@pytest.mark.parametrize(
    "case, transpose",
    [pytest.param(case, transpose, id=f"{_decode_id(case)}-{'a@Lt' if transpose else 'a@Lt^T'}")
     for case, directions in DECODE_CASES for transpose in directions],
)  # fmt: skip
def test_decode_kernels(case, transpose):
    """T <= 4: CUDA-core kernels, one launch each, against bitsandbytes' dequantisation + float64."""
    dtype, tokens, rows, cols, double_quant, core = case
    state, packed, bnb_state = _bnb_state(rows, cols, core, double_quant)
    a = torch.randn(tokens, rows if transpose else cols).to(dtype)
    assert nf4_path(state, tokens, a) == "decode"
    dense64 = bnb_functional.dequantize_4bit(packed, bnb_state).double()
    ours = nf4_matmul(a, state, transpose=transpose)
    same = a @ dense64.to(dtype) if transpose else a @ dense64.to(dtype).t()
    ref = a.double() @ dense64 if transpose else a.double() @ dense64.t()
    assert ours.shape == ref.shape and ours.dtype == dtype
    assert_within_rule(ours, same, ref, dtype, f"NF4 decode T={tokens} transpose={transpose}")
    assert torch.equal(ours, nf4_matmul(a, state, transpose=transpose))  # reproducible


def test_decode_kernel_reads_strided_activations():
    state, packed, bnb_state = _bnb_state(64, 256, torch.bfloat16, True)
    a = torch.randn(3, 512).to(torch.bfloat16)[:, ::2]  # the last dim is not contiguous
    dense64 = bnb_functional.dequantize_4bit(packed, bnb_state).double()
    assert_within_rule(nf4_matmul(a, state), a @ dense64.to(a.dtype).t(), a.double() @ dense64.t(), torch.bfloat16,
                       "strided")  # fmt: skip


def test_a_core_not_aligned_to_words_takes_the_fused_kernel():
    """The decode kernels read the codes as 32-bit words; a packed buffer at an odd address (a
    view into a larger buffer) goes to the fused kernel, which reads bytes, and gives the same
    product."""
    state, packed, bnb_state = _bnb_state(8, 128, torch.bfloat16, True)
    odd = torch.zeros(state.packed.numel() + 1, dtype=torch.uint8)[1:].view_as(state.packed)
    odd.copy_(state.packed)
    shifted = dataclasses.replace(state, packed=odd)
    a = torch.randn(1, 128).to(torch.bfloat16)
    assert nf4_path(state, 1, a) == "decode" and nf4_path(shifted, 1, a) == "fused"
    dense64 = bnb_functional.dequantize_4bit(packed, bnb_state).double()
    assert_within_rule(nf4_matmul(a, shifted), a @ dense64.to(a.dtype).t(), a.double() @ dense64.t(), torch.bfloat16,
                       "misaligned core")  # fmt: skip


@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
@pytest.mark.parametrize("tokens", [DECODE_MAX_T + 1, 16, 33, 64])
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=DTYPE_IDS.get)
# (100, 1152): N not a tile multiple, K = 18 scale blocks in several splits. (37, 320): K = 5
# blocks, so the last 128-value K tile is half masked (an output tile, transposed).
@pytest.mark.parametrize(("rows", "cols"), [(100, 1152), (37, 320)], ids=str)
def test_fused_small_t_gemm(dtype, tokens, transpose, rows, cols):
    state, packed, bnb_state = _bnb_state(rows, cols, torch.bfloat16, True)
    dense64 = bnb_functional.dequantize_4bit(packed, bnb_state).double()
    a = torch.randn(tokens, rows if transpose else cols).to(dtype)
    assert nf4_path(state, tokens, a) == "fused"
    ours = nf4_matmul(a, state, transpose=transpose)
    same = a @ dense64.to(dtype) if transpose else a @ dense64.to(dtype).t()
    ref = a.double() @ dense64 if transpose else a.double() @ dense64.t()
    assert ours.shape == ref.shape and ours.dtype == dtype
    assert_within_rule(ours, same, ref, dtype, f"NF4 GEMM T={tokens} transpose={transpose}")
    assert torch.equal(ours, nf4_matmul(a, state, transpose=transpose))  # reproducible


@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
@pytest.mark.parametrize("tokens", [DECODE_MAX_T + 1, 64])
@pytest.mark.parametrize(("rows", "cols"), [(100, 1152), (37, 320)], ids=str)
def test_fused_small_t_gemm_with_ampere_tiles(monkeypatch, tokens, transpose, rows, cols):
    """An A100 gets 64-value K tiles (nf4_launchers.FUSED_TILES): the same kernels, other splits
    and masks, checked here as a Hopper's are above."""
    from fura_kernels.triton import nf4_launchers

    monkeypatch.setattr(nf4_launchers, "capability_major", lambda device: 8)
    assert nf4_launchers.fused_tiles(8).block_k == 64
    state, packed, bnb_state = _bnb_state(rows, cols, torch.bfloat16, True)
    dense64 = bnb_functional.dequantize_4bit(packed, bnb_state).double()
    a = torch.randn(tokens, rows if transpose else cols).to(torch.bfloat16)
    ours = nf4_matmul(a, state, transpose=transpose)
    same = a @ dense64.to(a.dtype) if transpose else a @ dense64.to(a.dtype).t()
    ref = a.double() @ dense64 if transpose else a.double() @ dense64.t()
    assert_within_rule(ours, same, ref, torch.bfloat16, f"NF4 GEMM (Ampere tiles) T={tokens} transpose={transpose}")


@pytest.mark.parametrize("tokens", [3, SMALL_T_MAX, 150], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
def test_qfura_layer_on_the_triton_path(dtype, tokens):
    """T = 3 takes the decode kernels, T = 64 the fused ones, T = 150 > out the weight-side merge
    forward and dequantise-then-GEMM backward."""
    layer = QFusedBTTLinear.from_linear(nn.Linear(256, 96).to(dtype))
    with torch.no_grad():
        layer.btt_r.add_(0.05 * layer.btt_r.abs().mean() * torch.randn_like(layer.btt_r))
        layer.btt_s.mul_(1 + 0.05 * torch.randn_like(layer.btt_s))
    check_qfura_layer(layer, tokens, dtype)


def test_rows_not_a_multiple_of_64_fall_back_and_say_so_once():
    layer = QFusedBTTLinear.from_linear(nn.Linear(90, 40), module_name="odd")  # core rows: n*r = 90
    x = torch.randn(3, 90)
    with pytest.warns(UserWarning, match=r"NF4 core of shape \(40, 90\): rows of 90 values are not a multiple of 64"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(layer(x), y)
    ref = reference.forward(x.double(), layer.dequantized_l(torch.float64), layer.btt_r.double(),
                            layer.btt_s.double(), layer.bias.double())  # fmt: skip
    assert (y.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_two_threads_running_two_layers_do_not_corrupt_each_other(monkeypatch):
    """The shared scratch buffer made two threads' QFuRA layers overwrite each other's
    dequantised cores (13 of 20 outputs wrong, max error 3.2); a core now lives only inside the
    op that dequantised it."""
    from triton.runtime import interpreter

    # Triton's interpreter is not thread-safe itself: run each launch whole, as a GPU stream
    # does, and let the threads interleave between launches, where a shared buffer would race.
    lock = threading.Lock()
    launch = interpreter.GridExecutor.__call__

    def one_launch_at_a_time(self, *args, **kwargs):
        with lock:
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", one_launch_at_a_time)
    torch.manual_seed(0)
    layers = [QFusedBTTLinear.from_linear(nn.Linear(128, 96)) for _ in range(2)]  # same shape, other cores
    inputs = [torch.randn(100, 128) for _ in range(2)]  # T > 64 and > out: dequantise paths
    with torch.no_grad():
        expected = [layer(x) for layer, x in zip(layers, inputs, strict=True)]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def run(i):
        barrier.wait()
        with torch.no_grad():
            for _ in range(10):
                results[i].append(layers[i](inputs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong = sum(not torch.equal(y, expected[i]) for i, ys in results.items() for y in ys)
    assert wrong == 0 and all(len(ys) == 10 for ys in results.values())
