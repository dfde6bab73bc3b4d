"""Kernel microbenchmarks through pytest-benchmark: `pytest bench/ --benchmark-only`.

Same kernels and shapes as the `kernels` suite of `fura-bench` (Llama-3-8B q_proj and down_proj
blocks; on a CPU the shapes are divided by 16 and the PyTorch path runs).
"""

from __future__ import annotations

import pytest
import torch

from fura_kernels.nf4 import quantize_nf4
from fura_kernels.triton import block_diag_matmul, block_diag_matmul_backward
from fura_kernels.triton.nf4_ops import nf4_dequantize, nf4_matmul

from ..suites import LLAMA3_8B, PROFILES, _rotating, _weight_sets, scaled
from ..timing import measure

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = [LLAMA3_8B[0], LLAMA3_8B[4]] if DEVICE.type == "cuda" else [scaled(LLAMA3_8B[0], 16), scaled(LLAMA3_8B[4], 16)]
TOKENS = 8192 if DEVICE.type == "cuda" else 256


# Weight-bound kernels rotate weight copies as the suite does (Profile.rotate_bytes).
PROFILE = PROFILES["quick" if DEVICE.type == "cuda" else "cpu-quick"]


def _run(benchmark, fn, *args):
    """Time `fn(*args)` with the suite's harness (`bench.timing.measure`: warm-up, CUDA events
    or perf_counter, median and 20/80 percentiles, kept in `extra_info`) and through
    pytest-benchmark's own rounds; list arguments rotate, one element per call, as in the suite."""
    step = _rotating(fn, *args)
    benchmark.extra_info.update({f"harness_{k}_ms": v for k, v in measure(step, DEVICE, 3, 20).items()
                                 if isinstance(v, float)})  # fmt: skip
    calls = iter(range(1 << 30))

    def call():
        step(next(calls))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, warmup_rounds=3, rounds=20)


def _nf4_states(case):
    sets = _weight_sets(case.out_features * case.in_features // 2, PROFILE)
    return [quantize_nf4(torch.randn(case.out_features, case.in_features)).to(DEVICE) for _ in range(sets)]


def _trained_core(case):
    """R in its fp32 storage and S, as a training step hands them to the kernels."""
    return torch.randn(case.n, case.b, case.b, device=DEVICE), torch.rand(case.n, case.b, device=DEVICE) + 0.5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_k1(benchmark, case):
    x = torch.randn(TOKENS, case.n, case.b, device=DEVICE, dtype=DTYPE)
    _run(benchmark, block_diag_matmul, x, *_trained_core(case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_k3(benchmark, case):
    x = torch.randn(TOKENS, case.n, case.b, device=DEVICE, dtype=DTYPE)
    g = torch.randn(TOKENS, case.n, case.b, device=DEVICE, dtype=DTYPE)
    _run(benchmark, block_diag_matmul_backward, g, x, *_trained_core(case), True, True, True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_weight_side_merge(benchmark, case):
    sets = _weight_sets(case.out_features * case.in_features * DTYPE.itemsize, PROFILE)
    cores = [torch.randn(case.out_features, case.n, case.b, device=DEVICE, dtype=DTYPE) for _ in range(sets)]
    w, s = _trained_core(case)
    _run(benchmark, block_diag_matmul, cores, w.transpose(1, 2), s, True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_nf4_dequantize(benchmark, case):
    out = torch.empty(case.out_features * case.in_features, device=DEVICE, dtype=DTYPE)
    _run(benchmark, nf4_dequantize, _nf4_states(case), DTYPE, out)


@pytest.mark.parametrize("tokens", [1, 16])
def test_nf4_small_t_gemm(benchmark, tokens):
    case = CASES[0]
    a = torch.randn(tokens, case.in_features, device=DEVICE, dtype=DTYPE)
    _run(benchmark, nf4_matmul, a, _nf4_states(case))
