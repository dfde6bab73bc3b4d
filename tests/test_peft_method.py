"""FuRA as a PEFT method (`fura_kernels.peft`, the transform form of FURA_SPEC.md §11), on real
PEFT, transformers, bitsandbytes and TRL: init, training against FusedBTTLinear, save/load,
merge, several adapters, quantised and Conv1D bases, refusals, and the L-form round trip."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft import mapping as peft_mapping
from safetensors.torch import load_file

import fura_kernels.peft
from fura_kernels import FuRAConfig, FusedBTTLinear, convert_to_fura
from fura_kernels.peft import FuRALinear, FuRAModel, FuRAPeftConfig, fura_to_peft, peft_to_fura

from .helpers import max_rel_err, tiny_llama

IDS = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(7))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft(model, adapter_name="default", **fields):
    fields.setdefault("target_modules", "all-linear")
    fields.setdefault("progress_bar", False)
    return get_peft_model(model, FuRAPeftConfig(**fields), adapter_name=adapter_name)


def _train(model, steps=3, lr=1e-2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        data = torch.randint(0, 97, (4, 16), generator=generator)
        opt.zero_grad()
        model(input_ids=data, labels=data).loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A FuRA adapter trained 3 steps on the tiny Llama, saved by PEFT; and its logits."""
    model = _train(_peft(tiny_llama(), task_type="CAUSAL_LM"))
    directory = tmp_path_factory.mktemp("fura-peft")
    model.save_pretrained(directory)
    return directory, _logits(model)


# ------------------------------------------------------------------------------------------------
# registration: fails loudly if a PEFT release stops finding methods through these tables


def test_peft_finds_the_method_through_its_tables(tmp_path):
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["FURA"] is FuRAPeftConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["FURA"] is FuRAModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["FURA"] == "fura_"
    fura_kernels.peft.register()  # idempotent
    model = _peft(tiny_llama(), target_modules=["q_proj"])
    assert isinstance(model, PeftModel) and isinstance(model.base_model, FuRAModel)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FURA" and saved["target_modules"] == ["q_proj"]
    assert type(PeftConfig.from_pretrained(tmp_path)) is FuRAPeftConfig


# ------------------------------------------------------------------------------------------------
# tiny Llama, fp32


def test_init_equals_the_base_and_adds_nothing_weight_sized():
    base = tiny_llama()
    reference = _logits(base)
    before = {id(p): p for p in base.parameters()}
    model = _peft(base)
    assert max_rel_err(_logits(model), reference) <= 1e-5
    layers = [m for m in model.modules() if isinstance(m, FuRALinear)]
    assert len(layers) == 14  # 7 projections x 2 blocks
    for layer in layers:
        base_layer = layer.get_base_layer()
        assert id(base_layer.weight) in before  # the base weight is the very same tensor, untouched
        weight_size = layer.in_features * layer.out_features
        added = [t for n, t in layer.named_parameters() if not n.startswith("base_layer")]
        added += [t for n, t in layer.named_buffers() if not n.startswith("base_layer")]
        for t in added:
            assert t.numel() < weight_size / 2, (layer.module_name, tuple(t.shape))
        b = layer.block_shapes["default"].b
        assert sum(t.numel() for t in added) <= 2 * layer.in_features * (b + 1) + layer.out_features + 32
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "fura_" in n and p.requires_grad)


def _matched(fused_model, peft_model):
    inner = peft_model.base_model.model
    return [(name, m, inner.get_submodule(name)) for name, m in fused_model.named_modules()
            if isinstance(m, FusedBTTLinear)]  # fmt: skip


def _grads(layer, fused: bool):
    if fused:
        n, r = layer.block_shape.n, layer.block_shape.r
        grads = {"R": layer.btt_r.grad, "S": layer.btt_s.grad.reshape(n, r)}
        if layer.bias is not None:
            grads["bias"] = layer.bias.grad
        return grads
    grads = {"R": layer.fura_R["default"].grad, "S": layer.fura_S["default"].grad}
    if "default" in layer.fura_bias:
        grads["bias"] = layer.fura_bias["default"].grad
    return grads


def test_five_adamw_steps_match_fused_btt_linear_within_fp32_rounding():
    """Same start (the same block SVD), same data: the PEFT form's logits and every gradient stay
    as close to a float64 run of FusedBTTLinear as FusedBTTLinear's own fp32 run (STYLE.md rule).
    The atol, 1e-5 of the largest entry (about 100 fp32 ulps), absorbs what AdamW's normalised
    steps make of rounding-level differences over the steps; a wrong gradient is off by O(1)."""
    fused = tiny_llama()
    convert_to_fura(fused, "all-linear", FuRAConfig(), progress=False)
    ref = tiny_llama().double()
    convert_to_fura(ref, "all-linear", FuRAConfig(svd_dtype=torch.float64), progress=False)
    peft_model = _peft(tiny_llama())
    models = (fused, peft_model, ref)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
            for m in models]  # fmt: skip
    pairs = _matched(fused, peft_model)
    ref_layers = dict(ref.named_modules())
    generator = torch.Generator().manual_seed(3)
    for step in range(5):
        data = torch.randint(0, 97, (4, 16), generator=generator)
        logits = []
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            out = model(input_ids=data, labels=data)
            out.loss.backward()
            logits.append(out.logits.detach())
        fused_err = max_rel_err(logits[0], logits[2])
        assert max_rel_err(logits[1], logits[2]) <= 2 * fused_err + 1e-5, step
        for name, fused_layer, peft_layer in pairs:
            ours, theirs, exact = _grads(peft_layer, False), _grads(fused_layer, True), _grads(ref_layers[name], True)
            assert ours.keys() == theirs.keys() == exact.keys()
            for key in ours:
                err, base_err = max_rel_err(ours[key], exact[key]), max_rel_err(theirs[key], exact[key])
                assert err <= 2 * base_err + 1e-5, (step, name, key, err, base_err)
        for opt in opts:
            opt.step()


def test_save_and_from_pretrained_on_a_fresh_base_reproduce_the_trained_model(trained_dir):
    directory, trained = trained_dir
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    assert tensors and all(".fura_" in k for k in tensors)
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"fura_R", "fura_S", "fura_V0", "fura_S0", "fura_bias",
                                                       "fura_fingerprint"}  # fmt: skip
    assert all(v.dtype in (torch.float32, torch.uint8) for v in tensors.values())
    loaded = PeftModel.from_pretrained(tiny_llama(), directory)
    assert torch.equal(_logits(loaded), trained)
    merged = PeftModel.from_pretrained(tiny_llama(), directory).merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert max_rel_err(_logits(merged), trained) <= 1e-5


def test_loading_runs_no_svd(trained_dir, monkeypatch):
    import fura_kernels.peft.layer as layer_module

    def no_svd(*args, **kwargs):
        raise AssertionError("an adapter load ran an SVD")

    monkeypatch.setattr(layer_module, "block_svd", no_svd)
    directory, trained = trained_dir
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), directory, is_trainable=True)), trained)


def test_merge_unmerge_disable_and_two_adapters(trained_dir):
    directory, trained = trained_dir
    base_logits = _logits(tiny_llama())
    model = PeftModel.from_pretrained(tiny_llama(), directory, adapter_name="a")
    model.load_adapter(str(directory), adapter_name="b")
    other = _train(_peft(tiny_llama()), seed=5)
    other_logits = _logits(other)
    second = directory.parent / "second"
    other.save_pretrained(second)
    model.load_adapter(str(second), adapter_name="c")
    model.set_adapter("a")
    assert torch.equal(_logits(model), trained)
    model.set_adapter("c")
    assert torch.equal(_logits(model), other_logits)
    with model.disable_adapter():
        assert max_rel_err(_logits(model), base_logits) <= 1e-6
    model.merge_adapter()  # GRPO's vLLM path: merge, push the weights, unmerge
    assert max_rel_err(_logits(model), other_logits) <= 1e-5
    model.unmerge_adapter()
    assert max_rel_err(_logits(model), other_logits) <= 1e-5
    with torch.no_grad():  # a mixed batch runs each sequence's own adapter (tests/test_mixed_batch.py)
        mixed = model(input_ids=IDS[:2], adapter_names=["a", "c"]).logits
    assert max_rel_err(mixed, torch.stack([trained[0], other_logits[1]])) <= 1e-5
    model.base_model.set_adapter(["a", "c"])
    with pytest.raises(ValueError, match="only one can be active"):
        _logits(model)
    model.set_adapter("a")
    model.delete_adapter("c")
    assert max_rel_err(_logits(model), trained) <= 1e-5  # the base went through a merge and an unmerge
    assert "c" not in model.peft_config
    model.add_adapter("fresh", FuRAPeftConfig(target_modules="all-linear", progress_bar=False))  # a new SVD
    model.set_adapter("fresh")
    assert max_rel_err(_logits(model), base_logits) <= 1e-5


def test_a_different_base_is_refused_and_the_model_left_as_it_was(trained_dir):
    directory, _ = trained_dir
    other = tiny_llama(seed=1)
    reference = _logits(other)
    with pytest.raises(ValueError, match=r"trained on another base: layer .*q_proj.* nothing was loaded"):
        PeftModel.from_pretrained(other, directory)
    assert not any(isinstance(m, FuRALinear) for m in other.modules())
    assert torch.equal(_logits(other), reference)
    # by value, not by dtype: the same base in bf16 takes the adapter
    loaded = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), directory)
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.fura_R["default"].dtype == torch.float32


def test_bf16_base_with_autocast_trains_fp32_tensors():
    model = _peft(tiny_llama().to(torch.bfloat16))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.fura_R["default"].dtype == torch.float32 and layer.get_base_layer().weight.dtype == torch.bfloat16
    start = layer.fura_R["default"].detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _train(model, steps=2)
    assert not torch.equal(layer.fura_R["default"], start) and layer.fura_R["default"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# refusals


def test_what_the_transform_form_cannot_express_is_refused_by_name():
    with pytest.raises(ValueError, match="train_position='both' trains the L core"):
        FuRAPeftConfig(train_position="both")
    with pytest.raises(ValueError, match="s_merged_to='input'"):
        FuRAPeftConfig(s_merged_to="input")
    with pytest.raises(ValueError, match="decomp_mode='square'"):
        FuRAPeftConfig(decomp_mode="square")
    with pytest.raises(ValueError, match="svd_dtype"):
        FuRAPeftConfig(svd_dtype="bfloat16")
    model = tiny_llama()
    with torch.no_grad():  # one block of q_proj's input loses a direction
        model.model.layers[1].self_attn.q_proj.weight[:, 3] = model.model.layers[1].self_attn.q_proj.weight[:, 2]
    reference = _logits(model)
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj'.*zero singular value"):
        _peft(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj'.*trains the L core"):
        _peft(tiny_llama(), target_modules=["k_proj"], input_factorization=[1, 64])
    with pytest.raises(TypeError, match=r"'model.embed_tokens' is a Embedding"):
        _peft(tiny_llama(), target_modules=["embed_tokens"])
    assert torch.equal(_logits(model), reference)


def test_a_saved_config_starts_a_fresh_adapter_and_never_runs_without_its_tensors(trained_dir):
    directory, _ = trained_dir
    fresh = get_peft_model(tiny_llama(), PeftConfig.from_pretrained(directory))  # PEFT's generic reader: a new SVD
    assert max_rel_err(_logits(fresh), _logits(tiny_llama())) <= 1e-5
    waiting = get_peft_model(tiny_llama(), FuRAPeftConfig.from_pretrained(directory))  # what loading uses: no SVD
    with pytest.raises(RuntimeError, match="no saved tensors were loaded"):
        _logits(waiting)


# ------------------------------------------------------------------------------------------------
# other base layers


def test_bitsandbytes_4bit_base_inits_exactly_trains_saves_and_reloads(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from fura_kernels.recipes.baselines import quantize_linears_bnb

    def quantised():
        # bitsandbytes' CPU inference path packs 4-bit weights for its own kernel and fails on rows that
        # are not a multiple of 64 (down_proj's 112, without FuRA too): an intermediate size of 128.
        model = tiny_llama(intermediate_size=128)
        quantize_linears_bnb(model, ["q_proj", "v_proj", "down_proj"])
        return model

    base = quantised()
    reference = _logits(base)
    model = _peft(base, target_modules=["q_proj", "v_proj", "down_proj"])
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    assert max_rel_err(_logits(model), reference) <= 1e-5  # exactly the quantised base at init
    _train(model, steps=2)
    trained = _logits(model)
    assert max_rel_err(trained, reference) > 1e-3
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(PeftModel.from_pretrained(quantised(), tmp_path)), trained)
    with pytest.raises(ValueError, match="trained on another base"):  # the unquantised original is another base
        PeftModel.from_pretrained(tiny_llama(intermediate_size=128), tmp_path)


def test_bitsandbytes_8bit_base_inits_exactly():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    linear = model.model.layers[0].mlp.up_proj
    int8 = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
    int8.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    int8 = int8.to("cpu")
    model.model.layers[0].mlp.up_proj = int8
    try:
        reference = _logits(model)
    except Exception as err:  # bitsandbytes' 8-bit matmul has no CPU kernel in some builds
        pytest.skip(f"bitsandbytes 8-bit forward on the CPU: {err}")
    peft_model = _peft(model, target_modules=["up_proj"])
    assert max_rel_err(_logits(peft_model), reference) <= 1e-4


def test_gpt2_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)).eval()

    reference = _logits(gpt2())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that Conv1D is fan-in-fan-out
        model = _peft(gpt2(), target_modules=["c_attn", "c_proj", "c_fc"])
    assert max_rel_err(_logits(model), reference) <= 1e-5
    _train(model, steps=2)
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(PeftModel.from_pretrained(gpt2(), tmp_path)), trained)
    merged = PeftModel.from_pretrained(gpt2(), tmp_path).merge_and_unload()
    assert max_rel_err(_logits(merged), trained) <= 1e-5


# ------------------------------------------------------------------------------------------------
# the L form and back


def test_fusedbttlinear_to_peft_form_and_back_compute_the_same_function(tmp_path):
    model = tiny_llama()
    convert_to_fura(model, "all-linear", FuRAConfig(), progress=False)
    _train(model, steps=3)
    trained = _logits(model)
    peft_model = fura_to_peft(model)
    assert max_rel_err(_logits(peft_model), trained) <= 1e-5
    peft_model.save_pretrained(tmp_path)  # onto the original base: its fingerprint is the layers' own
    assert max_rel_err(_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path)), trained) <= 1e-5
    back = peft_to_fura(peft_model)
    assert sum(isinstance(m, FusedBTTLinear) for m in back.modules()) == 14
    assert max_rel_err(_logits(back), trained) <= 1e-5
    trainable = {n.rsplit(".", 1)[-1] for n, p in back.named_parameters() if p.requires_grad}
    assert trainable == {"btt_r", "btt_s", "bias"}
    base = back.model.layers[0].self_attn.q_proj.base_linear()  # the base is still known
    assert max_rel_err(base.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight) <= 1e-5


def test_fura_to_peft_refuses_qfura_and_leaves_the_model():
    pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    convert_to_fura(model, ["q_proj"], FuRAConfig(), quantize="nf4", progress=False)
    before = _logits(model)
    with pytest.raises(ValueError, match="stores L in NF4"):
        fura_to_peft(model)
    assert torch.equal(_logits(model), before)


def test_second_derivatives_through_the_transform():
    """create_graph=True (gradient penalties, Hessian-vector products) takes the differentiable
    path; it matches autograd through the einsum reference in float64."""
    from torch import nn

    from fura_kernels import reference

    torch.manual_seed(0)
    layer = FuRALinear(nn.Linear(48, 20).double(), "default", FuRAPeftConfig(progress_bar=False), module_name="p")
    with torch.no_grad():
        layer.fura_R["default"].add_(0.05 * torch.randn_like(layer.fura_R["default"]))
    layer.double()
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    r, s = layer.fura_R["default"], layer.fura_S["default"]

    def penalty(out):
        (grad_r,) = torch.autograd.grad(out.square().sum(), [r], create_graph=True)
        return torch.autograd.grad(grad_r.square().sum(), [x, s])

    ours = penalty(layer(x))
    maps = reference.transform_blocks(r, s, layer.fura_V0["default"], layer.fura_S0["default"])
    base = layer.get_base_layer()
    ref_out = torch.nn.functional.linear(reference.transform_forward(x, maps), base.weight, base.bias)
    ref_out = ref_out + layer.fura_bias["default"]
    for got, want in zip(ours, penalty(ref_out), strict=True):
        assert max_rel_err(got, want) <= 1e-10


def test_targets_match_as_for_lora():
    def adapted(**fields):
        model = _peft(tiny_llama(), **fields)
        return sorted(n.removeprefix("base_model.model.model.") for n, m in model.named_modules()
                      if isinstance(m, FuRALinear))  # fmt: skip

    assert adapted(target_modules=r".*\.mlp\.(up|down)_proj") == [
        "layers.0.mlp.down_proj", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj", "layers.1.mlp.up_proj"]  # fmt: skip
    assert adapted(target_modules="all-linear", exclude_modules=["down_proj", "gate_proj", "up_proj"]) == sorted(
        f"layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "kqov")  # fmt: skip
    assert adapted(target_modules=["o_proj"], layers_to_transform=[1]) == ["layers.1.self_attn.o_proj"]
    # head factorisation as FuRAConfig does it: o_proj's input cut at the 4 heads of 16
    model = _peft(tiny_llama(), target_modules=["o_proj"])
    assert model.base_model.model.model.layers[0].self_attn.o_proj.block_shapes["default"].n == 4


def test_merging_into_a_4bit_base_warns_and_stays_close(tmp_path):
    pytest.importorskip("bitsandbytes")
    from fura_kernels.recipes.baselines import quantize_linears_bnb

    model = tiny_llama(intermediate_size=128)
    original = _logits(model)
    quantize_linears_bnb(model, ["q_proj", "up_proj"])
    quantisation_error = max_rel_err(_logits(model), original)  # what NF4's rounding does to this model
    model = _train(_peft(model, target_modules=["q_proj", "up_proj"]), steps=2)
    trained = _logits(model)
    with pytest.warns(UserWarning, match="quantises the merged weight again"):
        merged = model.merge_and_unload()
    assert max_rel_err(_logits(merged), trained) <= 1.5 * quantisation_error  # one NF4 rounding, nothing more


def test_the_transform_layer_compiles_without_graph_breaks():
    """The transform runs through the K1/K3 custom ops (fake kernels registered): Dynamo traces a
    FuRA layer whole, and the compiled step gives the eager loss and gradients."""
    import torch._dynamo as dynamo

    model = _peft(tiny_llama())
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert dynamo.explain(layer)(torch.randn(2, 3, 112)).graph_break_count == 0
    eager = model(input_ids=IDS, labels=IDS)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")(input_ids=IDS, labels=IDS)
    compiled.loss.backward()
    assert max_rel_err(compiled.loss, eager.loss) <= 1e-6
    for name, p in model.named_parameters():
        if name in grads:
            assert max_rel_err(p.grad, grads[name]) <= 1e-5, name


def test_the_qlora_path_bitsandbytes_config_prepare_and_get_peft_model(tmp_path):
    """What a QLoRA user runs: from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)),
    prepare_model_for_kbit_training, get_peft_model; then save and PeftModel.from_pretrained."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(intermediate_size=128).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip

    def quantised_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")

    def logits(model):  # in train mode: bitsandbytes' CPU inference kernel (eval, no grad) computes in bf16
        model.train()
        return _logits(model)

    base = quantised_base()
    reference = logits(base)
    prepared = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(prepared, FuRAPeftConfig(target_modules="all-linear", progress_bar=False))
    assert max_rel_err(logits(model), reference) <= 1e-5
    _train(model, steps=2)
    trained = logits(model)
    assert max_rel_err(trained, reference) > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(PeftModel.from_pretrained(quantised_base(), tmp_path / "adapter")), trained)
