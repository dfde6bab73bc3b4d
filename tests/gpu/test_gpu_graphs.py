"""GPU tier: a whole FuRA training step is CUDA-graph capturable and replays to eager's bits.

Forward, backward and `AdamW(fused=True, capturable=True)` of a converted tiny Llama (FuRA,
QFuRA and the PEFT form), captured with `torch.cuda.graph` after eager warm-up steps (which also
finish autotuning), then replayed; the same model stepped eagerly must end with bit-identical
parameters. And the same step under `torch.compile(mode="reduce-overhead", fullgraph=True)`
(CUDA graphs through Inductor) trains like eager, at alternating lengths: 256 tokens (the GEMM
paths) and 32 (QFuRA's fused small-T NF4 kernels, whose fake once promised strides the kernel did
not return, and Inductor's graphs asserted). Skipped without CUDA (the `gpu` marker).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fura_kernels import convert_to_fura

from ..helpers import tiny_llama

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
WARMUP, STEPS = 3, 8


KINDS = ["fura", "qfura", "peft"]


def _model(kind="fura"):
    model = tiny_llama(seed=0, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    model = model.to(DEVICE, torch.bfloat16)
    if kind == "peft":
        from peft import get_peft_model

        from fura_kernels.peft import FuRAPeftConfig

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, FuRAPeftConfig(target_modules=targets, progress_bar=False)).base_model.model
    else:  # trainables stay fp32
        convert_to_fura(model, "all-linear", quantize="nf4" if kind == "qfura" else None, progress=False)
    return model.train()


def _optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)


def _loss(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(input_ids=ids, labels=ids).loss


def _batches(vocab):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randint(0, vocab, (4, 64), device=DEVICE, generator=generator) for _ in range(STEPS)]


@pytest.mark.parametrize("kind", KINDS)
def test_whole_step_capture_replays_to_eager_bits(kind):
    torch.backends.cudnn.deterministic = True
    eager = _model(kind)
    graphed = copy.deepcopy(eager)
    batches = _batches(eager.config.vocab_size)

    opt = _optimizer(eager)
    for ids in batches:
        _loss(eager, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    opt_g = _optimizer(graphed)
    static_ids = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up: real steps, and autotuning happens here
        for ids in batches[:WARMUP]:
            static_ids.copy_(ids)
            _loss(graphed, static_ids).backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _loss(graphed, static_ids)
        static_loss.backward()
        opt_g.step()
    for ids in batches[WARMUP:]:
        static_ids.copy_(ids)
        graph.replay()
    torch.cuda.synchronize()
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: graph replay differs from eager"


def _alternating(vocab):
    """Batches of 4 x 64 and 1 x 32 tokens in turn (see the module docstring)."""
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    shapes = [(4, 64), (1, 32)] * (STEPS // 2)
    return [torch.randint(0, vocab, shape, device=DEVICE, generator=generator) for shape in shapes]


@pytest.mark.inductor
@pytest.mark.parametrize("kind", KINDS)
def test_compile_reduce_overhead_trains_like_eager(kind):
    eager = _model(kind)
    compiled_model = copy.deepcopy(eager)
    batches = _alternating(eager.config.vocab_size)
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    losses = {}
    for name, model, module in (("eager", eager, eager), ("compiled", compiled, compiled_model)):
        opt = _optimizer(module)
        losses[name] = []
        for ids in batches:
            loss = _loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert all(torch.isfinite(torch.tensor(losses["compiled"])))
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=2e-2, atol=2e-2)
