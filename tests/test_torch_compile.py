"""FusedBTTLinear compiles under torch.compile(fullgraph=True), with no graph break, and trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fura_kernels import convert_to_fura

from .helpers import max_rel_err


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40), nn.GELU(), nn.Linear(40, 8))


def _train_eager_and_compiled(eager, x, target, steps):
    """The same steps on `eager` and a fullgraph-compiled copy: (eager losses, compiled losses,
    the compiled copy); graph breaks are counted from here on."""
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    opt_e = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=1e-2)
    opt_c = torch.optim.AdamW([p for p in compiled_model.parameters() if p.requires_grad], lr=1e-2)
    torch._dynamo.utils.counters.clear()
    losses_e, losses_c = [], []
    for _ in range(steps):
        for model, opt, losses in ((eager, opt_e, losses_e), (compiled, opt_c, losses_c)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses_e, losses_c, compiled_model


@pytest.mark.slow
def test_fullgraph_compile_trains_like_eager():
    eager = _mlp()
    convert_to_fura(eager, "all-linear", progress=False)
    # 64 rows: the first layer (out 96) takes the activation side and the others (out 40, 8)
    # the weight-side merge, so both dispatch paths are inside the compiled graph.
    x, target = torch.randn(64, 48), torch.randn(64, 8)
    losses_e, losses_c, compiled_model = _train_eager_and_compiled(eager, x, target, 5)
    assert losses_c[-1] < losses_c[0]
    for le, lc in zip(losses_e, losses_c, strict=True):
        assert abs(le - lc) <= 1e-4 * abs(le)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for p_e, p_c in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        assert max_rel_err(p_c, p_e) < 1e-4


@pytest.mark.slow
def test_tiny_llama_fullgraph_no_recompile_per_size():
    """A tiny Llama with FuRA on every linear compiles with fullgraph=True and dynamic shapes:
    new batch sizes and sequence lengths reuse the graph (one more graph at most, when the
    token count crosses a layer's width and the forward switches to the weight-side merge)."""
    from fura_kernels import convert_to_fura

    from .helpers import tiny_llama

    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", progress=False)
    model.train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    opt_c = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt_e = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=1e-2)
    torch._dynamo.utils.counters.clear()
    losses_c, losses_e = [], []
    for batch, seq in [(2, 8), (3, 12), (2, 20), (4, 32)]:  # T = 16, 36, 40 < 64 = width < 128
        ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        for m, opt, losses in ((compiled, opt_c, losses_c), (eager, opt_e, losses_e)):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
    for lc, le in zip(losses_c, losses_e, strict=True):
        assert abs(lc - le) <= 1e-4 * abs(le)
    assert not torch._dynamo.utils.counters["graph_break"]
    # static first compile, one dynamic recompile, one for the merge branch: not one per size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


@pytest.mark.slow
def test_qfura_fullgraph_compile_trains_like_eager():
    """QFuRA's NF4 steps are custom ops with fake implementations: a QFuRA MLP compiles with
    fullgraph=True (no graph break) and trains like eager, through both the activation side
    and the weight-side merge."""
    torch.manual_seed(0)  # layers QFuRA can hold (out > b); 64 rows: activation side, then the merge
    eager = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48))
    convert_to_fura(eager, "all-linear", quantize="nf4", progress=False)
    losses_e, losses_c, _ = _train_eager_and_compiled(eager, torch.randn(64, 64), torch.randn(64, 48), 4)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert losses_c[-1] < losses_c[0]
    for le, lc in zip(losses_e, losses_c, strict=True):
        assert abs(le - lc) <= 1e-4 * abs(le)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _graph_ready_model(kind):
    """A tiny Llama with all seven projections adapted: FuRA, QFuRA, or the PEFT form (whose
    adapted HF model, the PeftModel's base, is what a Trainer compiles with torch_compile=True)."""
    from .helpers import tiny_llama

    model = tiny_llama(seed=0)
    if kind == "peft":
        from peft import get_peft_model

        from fura_kernels.peft import FuRAPeftConfig

        return get_peft_model(model, FuRAPeftConfig(target_modules=TARGETS, progress_bar=False)).base_model.model
    convert_to_fura(model, TARGETS, quantize="nf4" if kind == "qfura" else None, progress=False)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["fura", "qfura", "peft"])
def test_whole_model_fullgraph_compiles_and_steps_like_eager(kind, autocast):
    """The whole model compiles with fullgraph=True (aot_eager: the graphs Inductor would get, on
    a CPU): no graph break anywhere, the decoder layers included; three training steps (forward,
    backward, AdamW) give eager's losses and parameters bit for bit, in fp32 and under bf16
    autocast (the fair configuration's)."""
    if kind == "qfura":
        pytest.importorskip("bitsandbytes")
    torch._dynamo.reset()  # every test compiles the same HF code objects anew: no recompile limit carried over
    eager = _graph_ready_model(kind).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager", dynamic=False)
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, eager.config.vocab_size, (2, 16), generator=generator) for _ in range(3)]
    losses = {}
    for name, model, module in (("eager", eager, eager), ("compiled", compiled, compiled_model)):
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for ids in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # aot_eager runs the very ops eager runs: the same bits, not merely close ones.
    assert losses["compiled"] == losses["eager"]
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert torch.equal(p_c, p_e), name
