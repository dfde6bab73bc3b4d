"""Whole-model API: conversion, parameter counts, training, merge (FURA_SPEC.md §1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from fura_kernels import FuRAConfig, FusedBTTLinear, convert_to_fura, find_target_linears, merge_fura

from .helpers import max_rel_err, tiny_llama, train_causal_lm

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
)
QWEN3_1_7B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)


def meta_model(model_cls, config_cls, **kwargs):
    with torch.device("meta"):
        return model_cls(config_cls(**kwargs))


@pytest.mark.parametrize(
    "name, builder, by_head, expected",
    [
        ("llama3-8b", lambda: meta_model(LlamaForCausalLM, LlamaConfig, **LLAMA3_8B), True, 118_685_696),
        # Without head factorisation o_proj is cut 64 x 64 instead of 32 x 128.
        ("llama3-8b-no-heads", lambda: meta_model(LlamaForCausalLM, LlamaConfig, **LLAMA3_8B), False, 110_297_088),
        ("qwen3-1.7b", lambda: meta_model(Qwen3ForCausalLM, Qwen3Config, **QWEN3_1_7B), True, 42_721_280),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_parameter_counts_on_meta_skeletons(name, builder, by_head, expected):
    model = builder()
    report = convert_to_fura(model, "all-linear", FuRAConfig(factorize_by_head=by_head), progress=False)
    assert report.trainable_params == expected
    assert len(report.converted) == 7 * model.config.num_hidden_layers
    assert not any("lm_head" in n for n in report.converted)
    layer = model.get_submodule(report.converted[0])
    assert isinstance(layer, FusedBTTLinear) and layer.btt_l.device.type == "meta"
    # Every trainable tensor is a FuRA R, S (no biases on these models).
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"btt_r", "btt_s"}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_llama_convert_train_merge():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    before = _logits(model, ids)
    report = convert_to_fura(model, "all-linear", progress=False)
    assert len(report.converted) == 14 and "lm_head" not in report.converted
    assert report.trainable_params < report.total_params
    assert "converted 14 linear layers" in str(report)
    assert max_rel_err(_logits(model, ids), before) < 1e-5

    # Only FuRA tensors (and the projections' biases) train; embeddings, norms, lm_head are frozen.
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.rsplit(".", 1)[-1] in ("btt_r", "btt_s", "bias")), name

    losses = train_causal_lm(model, steps=20)
    assert losses[-1] < 0.93 * losses[0]

    trained = _logits(model, ids)
    assert max_rel_err(trained, before) > 1e-3
    merge_fura(model)
    assert not any(isinstance(m, FusedBTTLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert max_rel_err(_logits(model, ids), trained) < 1e-5


def test_target_module_matching():
    model = tiny_llama()
    assert find_target_linears(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert find_target_linears(model, r".*\.mlp\..*_proj") == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    all_linear = find_target_linears(model, "all-linear", exclude_modules=["down_proj"])
    assert len(all_linear) == 12 and "lm_head" not in all_linear
    assert find_target_linears(model, ["lm_head"]) == ["lm_head"]  # asked for by name, it is taken
    assert find_target_linears(model, "all-linear", exclude_modules=r"model\.layers\.1\..*") == [
        f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    ] + [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def test_conversion_works_on_plain_torch_models():
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 12))
    x = torch.randn(5, 24)
    before = model(x).detach()
    report = convert_to_fura(model, ["0", "2"], progress=False)
    assert report.converted == ["0", "2"]
    assert max_rel_err(model(x), before) < 1e-5
    merged = merge_fura(model)
    assert max_rel_err(merged(x), before) < 1e-5


def test_merge_fura_on_a_single_layer_returns_a_linear():
    layer = FusedBTTLinear.from_linear(nn.Linear(16, 8))
    assert isinstance(merge_fura(layer), nn.Linear)
