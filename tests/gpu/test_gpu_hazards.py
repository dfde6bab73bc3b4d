"""GPU tier: what only a GPU shows. Races between programs, graph pools that reuse memory, and
launch-to-launch state.

- K3 with several T splits (its last-arriving program reduces the others' partials) captured in
  a CUDA graph and replayed ~200 times on fresh inputs, equal to an eager call every time.
- `torch.compile(mode="reduce-overhead")` at alternating sequence lengths (two graphs in
  Inductor's CUDA-graph tree, sharing one memory pool) against eager at every step: K3's cached
  counters and the NF4 level table must not live in that pool, where a later graph would
  overwrite them.
- The NF4 decode kernels at T = 2, 3 and 4 (T = 1 and the tensor-core range are in
  test_gpu_qfura.py) at Llama-3-8B sizes, and their byte-permute decoding (PTX, which no CPU
  tier runs) against their table path, bit for bit.
- Determinism: the same inputs give the same bits over many launches (K3's split reduction and
  the NF4 decode reduction sum in a fixed order).

Skipped without CUDA (the `gpu` marker).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fura_kernels import FusedBTTLinear, QFusedBTTLinear, convert_to_fura, reference
from fura_kernels.nf4 import NF4Tensor
from fura_kernels.triton import block_diag_matmul_backward
from fura_kernels.triton.autotuning import split_rows
from fura_kernels.triton.nf4_ops import nf4_matmul

from ..helpers import assert_within_rule, tiny_llama

pytestmark = pytest.mark.gpu
DEVICE, BF16 = "cuda", torch.bfloat16
REPLAYS = 200


def test_k3_with_several_splits_replays_like_eager():
    tokens, nblk, width = 4096, 8, 64
    assert split_rows(tokens, nblk)[1] > 1  # the last-arriving program really reduces others' partials
    g = torch.randn(tokens, nblk, width, device=DEVICE, dtype=BF16)
    x = torch.randn(tokens, nblk, width, device=DEVICE, dtype=BF16)
    w = torch.randn(nblk, width, width, device=DEVICE) / width**0.5  # R in its fp32 storage
    s = torch.rand(nblk, width, device=DEVICE) + 0.5

    def call():
        return block_diag_matmul_backward(g, x, w, s, True, True, True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotuning happens here, outside the capture
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = call()
    for i in range(REPLAYS):
        g.normal_()
        x.normal_()
        graph.replay()
        eager = call()
        for name, a, b in zip(("dx", "dR", "dS"), static, eager, strict=True):
            assert torch.equal(a, b), f"replay {i}: {name} differs from the eager call"
    ref = call()
    _, dw64, ds64 = block_diag_matmul_backward(g.double(), x.double(), w.double(), s.double(), True, True, True)
    assert_within_rule(static[1], ref[1], dw64, BF16, "K3 dR after replays")
    assert_within_rule(static[2], ref[2], ds64, BF16, "K3 dS after replays")


def _model(quantize):
    model = tiny_llama(seed=0, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    model = model.to(DEVICE, BF16)
    convert_to_fura(model, "all-linear", quantize=quantize, progress=False)
    return model.train()


def _step(model, optimizer, ids) -> float:
    with torch.autocast("cuda", dtype=BF16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.inductor
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["fura", "qfura"])
def test_reduce_overhead_at_alternating_lengths_matches_eager_every_step(quantize):
    eager = _model(quantize)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, mode="reduce-overhead")
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, fused=True)
                  for m in (eager, compiled_module)]  # fmt: skip
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for step, seq in enumerate([32, 48] * 6):
        ids = torch.randint(0, eager.config.vocab_size, (2, seq), device=DEVICE, generator=generator)
        want = _step(eager, optimizers[0], ids)
        torch.compiler.cudagraph_mark_step_begin()
        got = _step(compiled, optimizers[1], ids)
        assert abs(got - want) <= 2e-2 * abs(want), f"step {step} (T={seq}): compiled loss {got}, eager {want}"
    # A corrupted counter leaves K3's reduction unfinished (dR and dS unwritten), a corrupted level
    # table garbles every NF4 product: either shows in the next step's loss, compared above.
    for name, param in compiled_module.named_parameters():
        assert torch.isfinite(param).all(), f"{name}: not finite after compiled training"


def _nf4_core(rows, cols):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(rows, cols, device=DEVICE, dtype=BF16) / cols**0.5
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return NF4Tensor.from_bnb(packed, state), bnb_functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("tokens", [2, 3, 4])
@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336)], ids=str)
def test_decode_kernels_at_two_to_four_tokens(shape, transpose, tokens):
    nf4, dense = _nf4_core(*shape)
    a = torch.randn(tokens, shape[0] if transpose else shape[1], device=DEVICE, dtype=BF16)
    ours = nf4_matmul(a, nf4, transpose=transpose)
    same = a @ dense if transpose else a @ dense.t()
    ref = a.double() @ dense.double() if transpose else a.double() @ dense.double().t()
    assert_within_rule(ours, same, ref, BF16, f"NF4 decode {shape} T={tokens} transpose={transpose}")


@pytest.mark.parametrize("tokens", [1, 2, 4])
@pytest.mark.parametrize("transpose", [False, True], ids=["a@Lt^T", "a@Lt"])
@pytest.mark.parametrize("core", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_by_byte_permutes_gives_the_table_paths_bits(monkeypatch, core, transpose, tokens):
    from fura_kernels.triton import nf4_launchers

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(4096, 4096, device=DEVICE, dtype=core) / 64
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4 = NF4Tensor.from_bnb(packed, state)
    a = torch.randn(tokens, 4096, device=DEVICE, dtype=BF16)
    permuted = nf4_matmul(a, nf4, transpose=transpose)
    monkeypatch.setattr(nf4_launchers, "BYTE_PERMUTE", False)
    assert torch.equal(permuted, nf4_matmul(a, nf4, transpose=transpose))


ITERATIONS = 50


def _grads(layer, x, dy):
    y = layer(x)
    return (y, *torch.autograd.grad((y * dy).sum(), [x, layer.btt_r, layer.btt_s]))


@pytest.mark.parametrize("quantized", [False, True], ids=["fura", "qfura"])
@pytest.mark.parametrize("tokens", [1, 3, 8192])
def test_the_same_inputs_give_the_same_bits_every_time(quantized, tokens):
    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False, device=DEVICE, dtype=BF16)
    layer = (QFusedBTTLinear if quantized else FusedBTTLinear).from_linear(linear)
    x = torch.randn(tokens, 4096, device=DEVICE, dtype=BF16, requires_grad=True)
    dy = torch.randn(tokens, 4096, device=DEVICE, dtype=BF16)
    first = _grads(layer, x, dy)
    for i in range(ITERATIONS):
        again = _grads(layer, x, dy)
        for name, a, b in zip(("y", "dx", "dR", "dS"), first, again, strict=True):
            assert torch.equal(a, b), f"iteration {i}: {name} changed between identical calls"
    if not quantized:  # and the bits are right, not only repeatable
        r64, s64 = layer.btt_r.detach().double(), layer.btt_s.detach().double()
        y64 = reference.forward(x.detach().double(), layer.btt_l.detach().double(), r64, s64)
        y_same = reference.forward(x.detach(), layer.btt_l.detach(), r64.to(BF16), s64.to(BF16))
        assert_within_rule(first[0], y_same, y64, BF16, f"FuRA y T={tokens}")
