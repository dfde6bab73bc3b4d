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


@pytest.mark.slow
def test_fullgraph_compile_trains_like_eager():
    eager = _mlp()
    convert_to_fura(eager, "all-linear", progress=False)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    opt_e = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=1e-2)
    opt_c = torch.optim.AdamW([p for p in compiled_model.parameters() if p.requires_grad], lr=1e-2)
    # 64 rows: the first layer (out 96) takes the activation side and the others (out 40, 8)
    # the weight-side merge, so both dispatch paths are inside the compiled graph.
    x, target = torch.randn(64, 48), torch.randn(64, 8)
    torch._dynamo.utils.counters.clear()
    losses_e, losses_c = [], []
    for _ in range(5):
        for model, opt, losses in ((eager, opt_e, losses_e), (compiled, opt_c, losses_c)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses_c[-1] < losses_c[0]
    for le, lc in zip(losses_e, losses_c, strict=True):
        assert abs(le - lc) <= 1e-4 * abs(le)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for p_e, p_c in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        assert max_rel_err(p_c, p_e) < 1e-4
