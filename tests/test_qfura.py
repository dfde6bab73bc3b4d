"""QFusedBTTLinear (QFuRA): NF4 frozen core, on the CPU path (FURA_SPEC.md §5)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from fura_kernels import FuRAConfig, FusedBTTLinear, QFusedBTTLinear, convert_to_fura, merge_fura
from fura_kernels.nf4 import dequantize_nf4, quantize_nf4

from .helpers import DTYPE_IDS, check_qfura_layer, max_rel_err, tiny_llama, train_causal_lm

pytest.importorskip("bitsandbytes")


def _perturbed(layer):
    with torch.no_grad():
        layer.btt_r.add_(0.05 * layer.btt_r.abs().mean() * torch.randn_like(layer.btt_r))
        layer.btt_s.mul_(1 + 0.05 * torch.randn_like(layer.btt_s))
    return layer


@pytest.mark.parametrize("tokens", [5, 200], ids=["activation-side", "weight-merge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_forward_and_gradients_against_reference(dtype, tokens):
    check_qfura_layer(_perturbed(QFusedBTTLinear.from_linear(nn.Linear(256, 96).to(dtype))), tokens, dtype)


def test_quantised_core_is_the_fura_core_in_nf4():
    from bitsandbytes import functional as bnb_functional

    lin = nn.Linear(320, 128).to(torch.bfloat16)
    fura = FusedBTTLinear.from_linear(lin)
    qlayer = QFusedBTTLinear.from_fura(fura)
    core = fura.btt_l.detach()[0].t().contiguous()
    packed, state = bnb_functional.quantize_4bit(core, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(qlayer.l_core.packed, packed)  # quantised through bitsandbytes, bit for bit
    assert torch.equal(dequantize_nf4(qlayer.nf4_state()), bnb_functional.dequantize_4bit(packed, state))
    assert torch.equal(qlayer.btt_r, fura.btt_r) and torch.equal(qlayer.btt_s, fura.btt_s)
    rel = (qlayer.dequantized_l(torch.float32) - fura.btt_l.float()).norm() / fura.btt_l.float().norm()
    assert abs(rel.item() - qlayer.nf4_relative_error) < 1e-6  # the reported error is the real one
    assert 0.05 < qlayer.nf4_relative_error < 0.15  # NF4 on orthonormal columns: about 9-10%


def test_memory_half_a_byte_per_core_value_and_no_hidden_copy():
    out_f, in_f = 512, 1024
    layer = QFusedBTTLinear.from_linear(nn.Linear(in_f, out_f).to(torch.bfloat16))
    core_values = out_f * in_f  # n*r*out with r = b
    assert layer.nf4_bytes() / core_values <= 0.55
    assert layer.btt_l is None
    big = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
           if t.is_floating_point() and t.device.type != "meta" and t.numel() >= core_values // 4]  # fmt: skip
    assert big == [], big
    x = torch.randn(16, in_f, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).float().sum().backward()
    weight_sized = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= core_values // 4]
    assert weight_sized == [], weight_sized


def test_tiny_llama_qfura_trains_and_merges():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = convert_to_fura(model, "all-linear", quantize="nf4", progress=False)
    assert report.quantize == "nf4" and report.nf4_bytes > 0 and 0 < report.max_nf4_relative_error < 0.2
    assert "frozen cores in nf4" in str(report)
    assert all(isinstance(model.get_submodule(n), QFusedBTTLinear) for n in report.converted)
    with torch.no_grad():
        quantised = model(input_ids=ids).logits
    assert max_rel_err(quantised, before) < 0.5  # close to, not equal to, the original: NF4
    losses = train_causal_lm(model, steps=15)
    assert losses[-1] < 0.93 * losses[0]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        merge_fura(model)
        merged = model(input_ids=ids).logits
    assert not any(isinstance(m, FusedBTTLinear) for m in model.modules())
    assert max_rel_err(merged, trained) < 1e-5


def test_meta_conversion_with_nf4():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)  # fmt: skip
    with torch.device("meta"):
        quantised, plain = LlamaForCausalLM(config), LlamaForCausalLM(config)
    report = convert_to_fura(quantised, "all-linear", quantize="nf4", progress=False)
    assert report.trainable_params == convert_to_fura(plain, "all-linear", progress=False).trainable_params
    q_proj = quantised.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QFusedBTTLinear) and q_proj.l_core.packed.device.type == "meta"
    assert "NF4Core(shape=(256, 256), double_quant=True" in repr(q_proj)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_meta_qfura_materializes(double_quant):
    """A QFuRA model built on the meta device is allocated with `to_empty` and filled from a
    full state dict, like any module (it used to fail: "Cannot copy out of meta tensor")."""
    from fura_kernels.distributed import materialize_from_meta

    config = dict(hidden_size=128, intermediate_size=256)
    source = tiny_llama(seed=2, **config)
    convert_to_fura(source, "all-linear", quantize="nf4", double_quant=double_quant, progress=False)
    train_causal_lm(source, steps=2)
    with torch.device("meta"):
        target = type(source)(source.config)
    convert_to_fura(target, "all-linear", quantize="nf4", double_quant=double_quant, progress=False)
    materialize_from_meta(target, "cpu", source.state_dict())
    ids = torch.randint(0, source.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert max_rel_err(target.eval()(input_ids=ids).logits, source(input_ids=ids).logits) < 1e-6
    for name, buf in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], buf), name


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_dtype_moves_keep_nf4_buffers(double_quant):
    layer = QFusedBTTLinear.from_linear(nn.Linear(128, 64).to(torch.bfloat16), double_quant=double_quant)
    before = {n: b.clone() for n, b in layer.state_dict().items()}
    layer.to(torch.float16).half().float().to(torch.float16)
    for name, buf in layer.state_dict().items():
        if name.startswith("l_core."):  # the NF4 statistics keep their bits through every cast
            assert buf.dtype == before[name].dtype and torch.equal(buf, before[name]), name
    assert layer.l_core.dtype == torch.float16  # the dtype it dequantises to follows the module
    assert layer.btt_r.dtype == torch.float16 and layer.to_linear().weight.dtype == torch.float16
    dequantized = layer.dequantized_l()
    assert dequantized.dtype == torch.float16 and torch.isfinite(dequantized).all()


def test_works_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    lin = nn.Linear(128, 64)
    layer = QFusedBTTLinear.from_linear(lin)
    core = FusedBTTLinear.from_linear(lin).btt_l.detach()[0].t().contiguous()
    assert torch.equal(layer.l_core.packed, quantize_nf4(core, True).packed)


# --- bad input ---------------------------------------------------------------------------------
def test_unsupported_configurations():
    with pytest.raises(ValueError, match="'blk'.*train_position='large' trains L"):
        QFusedBTTLinear.from_linear(nn.Linear(64, 48), module_name="blk", train_position="large")
    with pytest.raises(ValueError, match="'blk'.*m=6 output blocks"):
        QFusedBTTLinear.from_linear(nn.Linear(64, 48), module_name="blk", decomp_mode="square")
    with pytest.raises(ValueError, match="quant_type='fp4' is not supported"):
        QFusedBTTLinear.from_linear(nn.Linear(64, 48), quant_type="fp4")


def test_corrupt_or_mismatched_state_leaves_the_layer_unchanged():
    layer = QFusedBTTLinear.from_linear(nn.Linear(128, 64), module_name="blk")
    before = {n: b.clone() for n, b in layer.named_buffers()}
    bad = quantize_nf4(torch.randn(64, 128), True)
    bad.absmax = bad.absmax[:-3]
    with pytest.raises(ValueError, match="QFusedBTTLinear 'blk': corrupt NF4 state"):
        layer.l_core.load_state(bad)
    with pytest.raises(ValueError, match="does not match the layer's core"):
        layer.l_core.load_state(quantize_nf4(torch.randn(32, 128), True))
    for name, buf in layer.named_buffers():
        assert torch.equal(buf, before[name])


def test_bad_quantize_argument_leaves_model_unchanged():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="quantize='int8' is not supported"):
        convert_to_fura(model, "all-linear", FuRAConfig(), quantize="int8", progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
