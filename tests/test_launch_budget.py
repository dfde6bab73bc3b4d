"""A FuRA training step dispatches no more device operations than PEFT LoRA r=32's, and none
to cast or fold the trainable tensors (each custom op counts as one launch, as on a GPU).

Counted on the CPU path in the fair configuration (bf16 base weights, fp32 trainables, bf16
autocast, AdamW(fused=True)); host time is `python -m bench host`'s (launch-only mode).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.launches import build_methods, count_step_launches
from fura_kernels import FuRAConfig, FusedBTTLinear


def _inputs(tokens, in_f, out_f):
    torch.manual_seed(0)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
    return x, torch.randn(tokens, out_f, dtype=torch.bfloat16)


@pytest.mark.parametrize("tokens", [16, 512], ids=["activation-side", "weight-side-merge"])
def test_fura_step_launches_no_more_than_lora(tokens):
    x, dy = _inputs(tokens, 256, 256)
    counts = {name: count_step_launches(build(), x, dy) for name, build in build_methods(256, 256).items()}
    assert len(counts["fura"]) <= len(counts["lora_r32"]), counts


@pytest.mark.parametrize("bias", [True, False], ids=["trained-bias", "no-bias"])
def test_no_cast_fold_or_reduction_launches(bias):
    """R and S reach the kernels in their fp32 storage (no R->bf16, S->bf16 or R*S launch), K3's
    epilogue writes dR and dS (no separate partial sum, dR or dS launch). The one cast left is a
    trained fp32 bias to the compute dtype."""
    torch.manual_seed(0)
    layer = FusedBTTLinear.from_linear(nn.Linear(256, 192, bias=bias).to(torch.bfloat16))
    x, dy = _inputs(32, 256, 192)
    ops = count_step_launches(layer, x, dy)
    forward = ["fura_kernels::block_diag_matmul"] + (["aten::_to_copy", "aten::addmm"] if bias else ["aten::mm"])
    backward = ["aten::mm", "fura_kernels::block_diag_backward"] + (["aten::sum"] if bias else [])  # sum: dbias
    step = ["aten::add_", "aten::_foreach_add_", "aten::_fused_adamw_"]  # x.grad accumulates; fused AdamW
    assert sorted(ops) == sorted(forward + backward + step), ops


def test_frozen_bias_layer_launches_no_cast():
    torch.manual_seed(0)
    layer = FusedBTTLinear.from_linear(nn.Linear(256, 192).to(torch.bfloat16), FuRAConfig(train_bias=False))
    x, dy = _inputs(32, 256, 192)
    assert "aten::_to_copy" not in count_step_launches(layer, x, dy)
