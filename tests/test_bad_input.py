"""Bad input gets an error that names the module and the value; a failed conversion changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fura_kernels import FuRAConfig, FusedBTTLinear, convert_to_fura

from .helpers import tiny_llama


@pytest.fixture
def layer():
    return FusedBTTLinear.from_linear(nn.Linear(24, 16), module_name="blocks.0.proj")


def test_wrong_input_width(layer):
    with pytest.raises(ValueError, match=r"'blocks.0.proj'.*\(3, 25\).*last dimension 25; expected in_features=24"):
        layer(torch.randn(3, 25))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(layer, dtype):
    with pytest.raises(TypeError, match=f"'blocks.0.proj': input dtype {dtype} is not floating point"):
        layer(torch.zeros(3, 24, dtype=dtype))


def test_device_mismatch(layer):
    with pytest.raises(ValueError, match="'blocks.0.proj': input is on meta but the layer's parameters are on cpu"):
        layer(torch.empty(3, 24, device="meta"))


def test_not_a_linear():
    with pytest.raises(TypeError, match="'emb'.*expected an nn.Linear, got Embedding"):
        FusedBTTLinear.from_linear(nn.Embedding(4, 4), module_name="emb")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(init="qr", s_merged_to="keep_trainable"), ValueError, "'keep_trainable' keeps singular values apart"),
        (dict(init="qr", s_merged_to="keep_frozen"), ValueError, "'keep_frozen' keeps singular values apart"),
        (dict(train_position="both", s_merged_to="frozen"), ValueError, "s_merged_to='frozen'.*train_position='both'"),
        (dict(train_position="both", s_merged_to="trainable"), ValueError, "'trainable'.*train_position='both'"),
        (dict(decomp_mode="diagonal"), ValueError, "decomp_mode.*'diagonal'"),
        (dict(rank=0), ValueError, "rank must be >= 1, got 0"),
        (dict(rank=1.5), ValueError, "fraction in \\(0, 1\\), got 1.5"),
        (dict(rank="half"), ValueError, "got 'half'"),
        (dict(rank=True), TypeError, "got True"),
        (dict(svd_dtype=torch.float16), ValueError, "svd_dtype.*float16"),
        (dict(trainable_dtype=torch.int8), ValueError, "trainable_dtype.*int8"),
        (dict(output_factorization=(2, 8)), ValueError, "conflicts with decomp_mode='output_one_block'"),
        (dict(decomp_mode="input_one_block", input_factorization=(2, 12)), ValueError, "conflicts"),
        (dict(input_factorization=(2,)), TypeError, "input_factorization.*\\(2,\\)"),
        (dict(init="qr", s_merged_to="output", rank=4), ValueError, "truncated QR"),
        # A string used to be read digit by digit, floats truncated, truthy strings taken as True.
        (dict(input_factorization="24"), TypeError, "input_factorization.*got '24'"),
        (dict(input_factorization=(2.5, 9.6)), TypeError, "input_factorization.*got \\(2.5, 9.6\\)"),
        (dict(input_factorization=(True, 24)), TypeError, "input_factorization"),
        (dict(train_bias="no"), TypeError, "train_bias: expected True or False, got 'no'"),
        (dict(factorize_by_head=1), TypeError, "factorize_by_head: expected True or False, got 1"),
        (dict(trainable_dtype=torch.float8_e4m3fn), ValueError, "trainable_dtype.*float8_e4m3fn"),
        (dict(trainable_dtype="int32"), ValueError, "trainable_dtype.*int32"),
    ],
)
def test_config_rules(kwargs, error, message):
    with pytest.raises(error, match=message):
        FuRAConfig(**kwargs)


def test_int_rank_above_min_a_b_names_the_layer():
    with pytest.raises(ValueError, match="'blocks.0.proj'.*rank=9 exceeds min\\(a, b\\)"):
        FusedBTTLinear.from_linear(nn.Linear(24, 16), module_name="blocks.0.proj", rank=9)  # blocks 16x6


def test_unknown_override():
    with pytest.raises(TypeError, match="no field"):
        FusedBTTLinear.from_linear(nn.Linear(24, 16), rnak=3)


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def _assert_unchanged(model, snapshot):
    modules, params = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (value, requires_grad) in params.items():
        same = torch.allclose(now[name], value, rtol=0, atol=0, equal_nan=True)
        assert same and now[name].requires_grad == requires_grad, name


def test_no_match_names_the_patterns():
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\].*matched no nn.Linear.*q_proj"):
        convert_to_fura(model, ["qkv"], progress=False)
    _assert_unchanged(model, snap)


def test_invalid_config_fails_before_any_layer_changes():
    model = tiny_llama()
    snap = _snapshot(model)
    # rank 12 fits o_proj (b = head_dim = 16) and down_proj (b = 14) but not the b = 8 layers.
    with pytest.raises(ValueError, match="rank=12 exceeds"):
        convert_to_fura(model, "all-linear", FuRAConfig(rank=12), progress=False)
    _assert_unchanged(model, snap)


def test_failure_midway_rolls_everything_back():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag the conversion would also touch
    with torch.no_grad():  # the last target layer cannot be factorised
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj'.*NaN or inf"):
        convert_to_fura(model, "all-linear", progress=False)
    _assert_unchanged(model, snap)
    assert not any(isinstance(m, FusedBTTLinear) for m in model.modules())


def test_bad_target_modules_type():
    with pytest.raises(TypeError, match="target_modules must be"):
        convert_to_fura(tiny_llama(), 42, progress=False)
    with pytest.raises(ValueError, match="not a valid regex"):
        convert_to_fura(tiny_llama(), "(unclosed", progress=False)


def test_config_is_frozen_and_replace_validates():
    config = FuRAConfig()
    with pytest.raises(AttributeError):
        config.rank = 0  # used to skip validation
    with pytest.raises(ValueError, match="rank must be >= 1"):
        config.replace(rank=0)
    assert config.replace(input_factorization=[4, 6]).input_factorization == (4, 6)  # JSON gives lists


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_public_fura_linear_refuses_integer_input(layer, dtype):
    """It used to return zeros."""
    from fura_kernels import fura_linear

    with pytest.raises(TypeError, match=f"fura_linear: input dtype {dtype} is not floating point"):
        fura_linear(torch.ones(3, 24, dtype=dtype), layer.btt_l, layer.btt_r, layer.btt_s, layer.bias)


def test_meta_forward_like_nn_linear():
    """nn.Linear runs on the meta device (shape inference); the autocast lookup used to fail there."""
    linear = nn.Linear(24, 16, device="meta")
    layer = FusedBTTLinear.from_linear(linear)
    x = torch.empty(2, 5, 24, device="meta")
    assert layer(x).shape == linear(x).shape == (2, 5, 16)
    assert layer(x).device.type == "meta"
