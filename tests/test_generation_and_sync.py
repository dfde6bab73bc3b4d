"""Generation through FuRA layers, and the weight-sync contract of `merged_named_weights`."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.timing import peak_memory
from fura_kernels import FusedBTTLinear, convert_to_fura, merge_fura, merged_named_weights

from .helpers import tiny_llama, train_causal_lm


def _trained(quantize=None, **config):
    model = tiny_llama(seed=0, **config)
    base_keys = set(model.state_dict())
    convert_to_fura(model, "all-linear", quantize=quantize, progress=False)
    train_causal_lm(model, steps=3)
    return model, base_keys


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["fura", "qfura"])
def test_greedy_generation_with_the_kv_cache_equals_the_merged_model(quantize):
    config = dict(hidden_size=128, intermediate_size=256) if quantize else {}
    model, _ = _trained(quantize, **config)
    merged = merge_fura(copy.deepcopy(model))
    assert not any(isinstance(m, FusedBTTLinear) for m in merged.modules())
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        ours, theirs = model.generate(prompt, **kwargs), merged.generate(prompt, **kwargs)
    assert ours.shape == (2, 19) and torch.equal(ours, theirs)


def test_merged_named_weights_use_the_base_checkpoint_names_and_merged_values():
    model, base_keys = _trained()
    pairs = dict(merged_named_weights(model))
    assert set(pairs) == base_keys  # every weight, under the name a base checkpoint gives it
    merged = merge_fura(copy.deepcopy(model)).state_dict()
    for name, value in pairs.items():
        assert torch.equal(value, merged[name]), name
    embed = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert pairs["model.embed_tokens.weight"].data_ptr() == embed.data_ptr()  # plain ones: no copy


def test_merged_named_weights_hold_about_one_layer_at_a_time():
    model, _ = _trained(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
    fura = [m for m in model.modules() if isinstance(m, FusedBTTLinear)]
    largest = max(m.in_features * m.out_features for m in fura) * 4
    everything = sum(m.in_features * m.out_features for m in fura) * 4

    def consume(_):
        for _, tensor in merged_named_weights(model):
            tensor.sum()  # an engine copies it; nothing keeps it

    peak = peak_memory(consume, torch.device("cpu"))
    assert peak <= 3 * largest < everything, (peak, largest, everything)
