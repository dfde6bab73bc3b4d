"""Every custom op's fake gives the real op's shape, dtype and strides (`torch.library.opcheck`).

torch.compile plans buffers from the fakes: a fake whose strides differ from what the op returns
is a silently wrong layout under Inductor, and under `mode="reduce-overhead"` (CUDA graphs) a
failed assertion. The first GPU run met one: `nf4_matmul`'s fused small-T kernels returned their
(T, out) result as a transposed view, strides (1, T), where the fake promises a contiguous
tensor. This file runs in both tiers: the PyTorch path (the main pass) and Triton's kernels under
the interpreter (`TRITON_INTERPRET=1`), where the fused, decode and dequantise paths run for
real; the launch-only tests run it once more with the production launchers.
"""

from __future__ import annotations

import pytest
import torch

from fura_kernels.nf4 import quantize_nf4
from fura_kernels.triton import ops  # noqa: F401 - registers the ops
from fura_kernels.triton.nf4_ops import nf4_path, state_args

FAKE_CHECK = ("test_schema", "test_faketensor")
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=FAKE_CHECK)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.get)
@pytest.mark.parametrize("tokens", [0, 1, 17, 64])
@pytest.mark.parametrize("scale", ["none", "columns", "rows"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_block_diag_matmul(dtype, tokens, scale, layout):
    nblk, k, n = 3, 16, 24
    x = torch.randn(tokens, nblk, 2 * k, dtype=dtype)[..., ::2] if layout == "strided" else torch.randn(tokens, nblk, k)
    x = x.to(dtype)
    w = torch.randn(nblk, k, n)
    s = {"none": None, "columns": torch.rand(nblk, n) + 0.5, "rows": torch.rand(nblk, k) + 0.5}[scale]
    _opcheck(torch.ops.fura_kernels.block_diag_matmul.default, (x, w, s, scale == "rows"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.get)
@pytest.mark.parametrize("tokens", [0, 1, 33])
@pytest.mark.parametrize(
    "wanted", [(True, True, True), (True, False, False), (False, True, True), (False, True, False)]
)
def test_block_diag_backward(dtype, tokens, wanted):
    nblk, k, n = 2, 16, 32
    g = torch.randn(tokens, nblk, n).to(dtype)
    x = torch.randn(tokens, nblk, k).to(dtype)
    w, s = torch.randn(nblk, k, n), torch.rand(nblk, n) + 0.5
    _opcheck(torch.ops.fura_kernels.block_diag_backward.default, (g, x, w, s, *wanted))


def test_segmented_block_transform():
    nblk, k, adapters = 2, 16, 3
    x = torch.randn(10, nblk, k)
    maps = torch.randn(adapters, nblk, k, k)
    rows = torch.randperm(10, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    offsets = torch.tensor([0, 4, 7, 10], dtype=torch.int32)
    slots = torch.tensor([2, -1, 0], dtype=torch.int32)
    _opcheck(torch.ops.fura_kernels.segmented_block_transform.default, (x, maps, rows, offsets, slots, 4))


# Token counts that reach every NF4 path: decode (1-4), the fused tensor-core kernels (5-64, with
# T equal to the kernels' token tile, 16, 32 and 64, where the transposed view was dense and kept
# its strides: the first GPU run's failure), and dequantise-then-GEMM (above 64).
NF4_TOKENS = [1, 3, 5, 16, 17, 32, 64, 65]


NF4_CASES = [(t, True) for t in NF4_TOKENS] + [(t, False) for t in (1, 16, 65)]  # (tokens, double quantisation)
NF4_IDS = [f"T{t}-{'dq' if d else 'absmax'}" for t, d in NF4_CASES]


@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.get)
@pytest.mark.parametrize(
    "tokens,double_quant", NF4_CASES, ids=[f"T{t}-{'dq' if d else 'absmax'}" for t, d in NF4_CASES]
)
def test_nf4_matmul(tokens, dtype, double_quant, transpose):
    rows, cols = 64, 128
    state = quantize_nf4(torch.randn(rows, cols).to(torch.bfloat16), double_quant=double_quant)
    a = torch.randn(tokens, rows if transpose else cols).to(dtype)
    nf4_path(state, tokens, a)  # (which path runs depends on the tier; each is checked where it runs)
    _opcheck(torch.ops.fura_kernels.nf4_matmul.default, (a, *state_args(state), transpose))


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
def test_nf4_merge_and_dequantize(double_quant):
    n, b, r, rows = 3, 16, 16, 64
    state = quantize_nf4(torch.randn(rows, n * r).to(torch.bfloat16), double_quant=double_quant)
    w, s = torch.randn(n, b, r), torch.rand(n, r) + 0.5
    for dtype in DTYPES:
        _opcheck(torch.ops.fura_kernels.nf4_merge.default, (*state_args(state), w, s, dtype))
        _opcheck(torch.ops.fura_kernels.nf4_dequantize.default, (*state_args(state), dtype))


def test_every_registered_op_is_checked_here():
    """A new custom op must get its fake checked: this file names every op of the namespace."""
    checked = {"block_diag_matmul", "block_diag_backward", "segmented_block_transform", "nf4_matmul", "nf4_merge",
               "nf4_dequantize"}  # fmt: skip
    registered = {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fura_kernels::")
    }
    assert registered == checked, f"ops without a fake check here: {sorted(registered - checked)}"
