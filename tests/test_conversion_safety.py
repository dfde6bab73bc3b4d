"""`convert_to_fura` converts what is safe, refuses the rest by name and reason, and handles
shared modules as one layer under all their names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fura_kernels import FuRAConfig, FusedBTTLinear, QFusedBTTLinear, convert_to_fura, merge_fura
from fura_kernels.model import count_parameters, print_trainable_parameters

from .helpers import max_rel_err, tiny_llama


def _outputs(module, *inputs):
    with torch.no_grad():
        return module(*inputs)


def test_transformer_layers_that_read_weights_are_refused_and_the_rest_converts():
    """nn.MultiheadAttention reads out_proj.weight itself, and nn.TransformerEncoderLayer's
    inference fast path reads linear1/linear2.weight: converting them crashed the first eval
    forward with "'FusedBTTLinear' object has no attribute 'weight'"."""
    encoder = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=48, dropout=0.0, batch_first=True)
    model = nn.Sequential(encoder, nn.Linear(32, 10)).eval()
    x = torch.randn(2, 5, 32)
    before = _outputs(model, x)
    with pytest.warns(UserWarning, match="0.self_attn.out_proj: nn.MultiheadAttention reads out_proj.weight"):
        report = convert_to_fura(model, "all-linear", progress=False)
    assert report.converted == ["1"]
    assert set(report.refused) == {"0.self_attn.out_proj", "0.linear1", "0.linear2"}
    assert "nn.TransformerEncoderLayer reads linear1.weight" in report.refused["0.linear1"]
    assert "not converted: 0.self_attn.out_proj (nn.MultiheadAttention" in str(report)
    assert type(encoder.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert max_rel_err(_outputs(model, x), before) < 1e-5  # eval forward (the fast path) runs


def test_only_unsafe_matches_raise_with_the_reason():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=48, batch_first=True)
    with pytest.raises(ValueError, match="matched only linears that cannot be converted safely: self_attn.out_proj"):
        convert_to_fura(layer, ["out_proj"], progress=False)
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


class ScaledLinear(nn.Linear):
    """A subclass with its own forward: converting it used to drop the scaling silently."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_subclass_with_its_own_forward_is_refused_by_name():
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), ScaledLinear(16, 8)).eval()
    x = torch.randn(3, 24)
    before = _outputs(model, x)
    with pytest.warns(UserWarning, match="2: ScaledLinear overrides nn.Linear.forward"):
        report = convert_to_fura(model, "all-linear", progress=False)
    assert report.converted == ["0"] and isinstance(model[2], ScaledLinear)
    assert max_rel_err(_outputs(model, x), before) < 1e-5


def test_tied_weights_are_refused():
    model = tiny_llama(tie_word_embeddings=True)
    model.tie_weights()
    with pytest.raises(ValueError, match="lm_head: its weight is shared with model.embed_tokens.weight"):
        convert_to_fura(model, ["lm_head"], progress=False)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(24, 16)
        self.b = self.a  # one module, two names
        self.c = nn.Linear(16, 16)

    def forward(self, x):
        return self.c(self.a(x)) + self.c(self.b(2 * x))


@pytest.mark.parametrize("targets", [["a"], ["b"], "all-linear"], ids=["by-first-name", "by-alias", "all"])
def test_a_shared_module_is_one_layer_under_all_its_names(targets):
    model = Shared().eval()
    x = torch.randn(3, 24)
    before = _outputs(model, x)
    report = convert_to_fura(model, targets, progress=False)
    assert isinstance(model.a, FusedBTTLinear) and model.b is model.a
    assert "a" in report.converted and report.aliases["a"] == ["b"]
    assert max_rel_err(_outputs(model, x), before) < 1e-5
    merge_fura(model)
    assert type(model.a) is nn.Linear and model.b is model.a
    assert max_rel_err(_outputs(model, x), before) < 1e-5


def test_converting_an_already_converted_model_says_so():
    model = tiny_llama()
    convert_to_fura(model, ["q_proj"], progress=False)
    with pytest.raises(ValueError, match="already converted.*q_proj.*load_fura_adapter.*merge_fura"):
        convert_to_fura(model, ["q_proj"], progress=False)
    convert_to_fura(model, ["v_proj"], progress=False)  # the rest still converts


@pytest.mark.parametrize(
    "targets, error, message",
    [
        (None, TypeError, "target_modules must be a list of module-name suffixes.*got None"),
        (42, TypeError, "target_modules must be"),
        ([1, 2], TypeError, "target_modules must be"),
    ],
    ids=["none", "int", "ints"],
)
def test_bad_target_modules(targets, error, message):
    with pytest.raises(error, match=message):
        convert_to_fura(tiny_llama(), targets, progress=False)


def test_target_modules_from_a_generator():
    model = tiny_llama()
    report = convert_to_fura(model, (name for name in ["q_proj", "v_proj"]), progress=False)
    assert len(report.converted) == 4  # two layers x (q, v); a generator is read once, not twice


@pytest.mark.parametrize(
    "linear, message",
    [
        (nn.Linear(31, 31), r"out_features=31 <= b=31 \(in_features=31 is one input block"),  # prime, square
        (nn.Linear(64, 6), r"out_features=6 <= b=8, so L \(288 values\) is not larger than R \(384\)"),
    ],
    ids=["prime-square", "out-below-b"],
)
def test_qfura_layout_is_checked_before_any_svd_and_says_why(linear, message, monkeypatch):
    import fura_kernels.layer as layer_module

    model = nn.Sequential(nn.Linear(64, 64), linear)

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran before the layout check")

    monkeypatch.setattr(layer_module, "block_svd", no_svd)
    with pytest.raises(ValueError, match=f"layer '1' cannot be QFuRA: {message}"):
        convert_to_fura(model, "all-linear", quantize="nf4", progress=False)
    with pytest.raises(ValueError, match="exclude_modules"):  # and says what to do instead
        convert_to_fura(model, "all-linear", quantize="nf4", progress=False)
    assert type(model[0]) is nn.Linear  # nothing converted


def test_qfura_trainable_share_counts_nf4_values_like_fura():
    """The report counted NF4 cores by their packed bytes, so QFuRA's share read 22.8% against
    FuRA's 8.4% for the same trainable tensors."""
    plain, quantised = tiny_llama(), tiny_llama()
    fura = convert_to_fura(plain, "all-linear", progress=False)
    qfura = convert_to_fura(quantised, "all-linear", quantize="nf4", progress=False)
    assert qfura.trainable_params == fura.trainable_params
    assert qfura.total_params == fura.total_params
    assert qfura.trainable_fraction == pytest.approx(fura.trainable_fraction)
    assert isinstance(quantised.model.layers[0].mlp.up_proj, QFusedBTTLinear)


def test_print_trainable_parameters_like_peft(capsys):
    model = tiny_llama()
    convert_to_fura(model, "all-linear", progress=False)
    trainable, total = count_parameters(model)
    model.print_trainable_parameters()
    expected = (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    assert capsys.readouterr().out.strip() == expected
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == expected


def test_count_parameters_counts_bitsandbytes_4bit_as_peft_does():
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from fura_kernels.recipes.baselines import quantize_linears_bnb

    model = tiny_llama()
    quantize_linears_bnb(model, ["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(peft_model) == peft_model.get_nb_trainable_parameters()


def test_config_errors_are_type_checked_before_conversion():
    with pytest.raises(TypeError, match="config must be a FuRAConfig"):
        convert_to_fura(tiny_llama(), "all-linear", {"rank": 4}, progress=False)
    assert FuRAConfig().replace(rank=4).rank == 4
