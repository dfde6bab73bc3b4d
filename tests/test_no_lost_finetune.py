"""Paths that used to lose a fine-tune or change it without a word (issue 22): each test failed
before its fix. Real tiny transformers models, real safetensors files, real sharded checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification
from transformers.trainer_utils import load_sharded_checkpoint

from fura_kernels import (
    FuRAConfig,
    FusedBTTLinear,
    convert_to_fura,
    load_fura_adapter,
    merge_fura,
    merged_named_weights,
    save_fura_adapter,
    save_merged,
)
from fura_kernels.adapters import ADAPTER_CONFIG, ADAPTER_SUBDIR, ADAPTER_WEIGHTS

from .helpers import max_rel_err, tiny_llama, train_causal_lm

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
FP32_ROUNDING = 1e-5  # logits of the same model rebuilt from the same tensors, fp32 SVD and merge rounding


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _train_autocast(model, steps=3, lr=1e-2):
    """A few AdamW steps in bf16 autocast on fp32 trainables (the Trainer's bf16=True)."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 97, (4, 16), generator=generator)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained_autocast(tmp_path_factory):
    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", progress=False)
    _train_autocast(model)
    directory = tmp_path_factory.mktemp("autocast") / "adapter"
    save_fura_adapter(model, directory)
    return model, directory


# 1. Layers whose L core trains -----------------------------------------------------------------


def _classifier(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


def _train_classifier(model, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=IDS, labels=labels).loss.backward()
        opt.step()
    model.eval()


def test_a_trained_l_core_is_saved_and_reloads(tmp_path):
    """`score` (64 -> 3) has out_features <= b, so the default layout trains its L core: the
    adapter stores it, and reloads onto a fresh base and onto the same model."""
    model = _classifier()
    convert_to_fura(model, "all-linear", progress=False)
    assert model.score.roles.train_l
    _train_classifier(model)
    save_fura_adapter(model, tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert "l_core.btt_l" in meta["layers"]["score"]["tensors"]
    for target in (_classifier(), model):
        load_fura_adapter(target, tmp_path, progress=False)
        assert max_rel_err(_logits(target), _logits(model)) < FP32_ROUNDING


@pytest.mark.parametrize(
    "overrides", [dict(train_position="large"), dict(train_position="both", s_merged_to="split"),
                  dict(decomp_mode="input_one_block")], ids=["large", "both", "input_one_block"],
)  # fmt: skip
def test_every_layout_reloads_after_training(tmp_path, overrides):
    model = tiny_llama(seed=0)
    convert_to_fura(model, ["q_proj", "down_proj"], FuRAConfig(**overrides), progress=False)
    train_causal_lm(model, steps=2)
    save_fura_adapter(model, tmp_path)
    for target in (tiny_llama(seed=0), model):
        load_fura_adapter(target, tmp_path, progress=False)
        assert max_rel_err(_logits(target), _logits(model)) < FP32_ROUNDING


# 2. A bf16-cast model -------------------------------------------------------------------------


def test_an_adapter_saved_from_a_bf16_cast_model_reloads(tmp_path):
    """DeepSpeed's bf16 mode casts the whole model, trainables included; its adapter holds the
    trainables in the config's dtype (fp32, exact) and reloads onto the bf16 model and a fresh
    fp32 base."""
    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", progress=False)
    train_causal_lm(model, steps=2)
    model.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    adapter = tmp_path / ADAPTER_SUBDIR
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(adapter / ADAPTER_WEIGHTS)).values()} == {torch.float32}
    load_fura_adapter(model, adapter, progress=False)  # the same bf16 model: same cores
    fresh = tiny_llama(seed=0)
    load_fura_adapter(fresh, adapter, progress=False)
    fresh_bf16 = _logits(fresh.to(torch.bfloat16))
    assert max_rel_err(fresh_bf16, _logits(model)) < 2**-6  # both run in bf16


# 3. The same base in another dtype ------------------------------------------------------------


def test_the_same_base_in_another_dtype_is_the_same_base(trained_autocast):
    model, directory = trained_autocast
    reference = _logits(model)
    for dtype in (torch.float32, torch.float64):
        fresh = tiny_llama(seed=0).to(dtype)
        load_fura_adapter(fresh, directory, progress=False)
        assert max_rel_err(_logits(fresh), reference) < FP32_ROUNDING, dtype
    # The base rounded to bf16: within bf16 rounding of the trained model (the STYLE.md rule
    # against the trained model run in bf16, whose own error is the "same dtype" term).
    fresh = tiny_llama(seed=0).to(torch.bfloat16)
    load_fura_adapter(fresh, directory, progress=False)
    own_bf16 = max_rel_err(_logits(model.to(torch.bfloat16)), reference)
    model.float()
    assert max_rel_err(_logits(fresh), reference) <= 2 * own_bf16 + 2**-8


def test_a_fine_tuned_checkpoint_is_another_base(trained_autocast):
    """Values identify the base: a checkpoint fine-tuned by 1e-3 of its scale is refused."""
    _, directory = trained_autocast
    other = tiny_llama(seed=0)
    with torch.no_grad():
        weight = other.model.layers[0].self_attn.q_proj.weight
        weight.add_(1e-3 * weight.abs().max() * torch.randn_like(weight))
    with pytest.raises(ValueError, match="base weight of 'model.layers.0.self_attn.q_proj' is not the one"):
        load_fura_adapter(other, directory, progress=False)


# 4. Adapter swap ------------------------------------------------------------------------------


def test_an_adapter_swap_gives_base_plus_the_new_adapter(tmp_path):
    a_model, b_model = tiny_llama(seed=0), tiny_llama(seed=0)
    convert_to_fura(a_model, "all-linear", progress=False)
    train_causal_lm(a_model, steps=3, seed=1)
    convert_to_fura(b_model, ["q_proj", "v_proj"], progress=False)
    train_causal_lm(b_model, steps=3, seed=2)
    save_fura_adapter(a_model, tmp_path / "a")
    save_fura_adapter(b_model, tmp_path / "b")
    clean_b = load_fura_adapter(tiny_llama(seed=0), tmp_path / "b", progress=False)

    swapped = load_fura_adapter(tiny_llama(seed=0), tmp_path / "a", progress=False)
    load_fura_adapter(swapped, tmp_path / "b", progress=False)
    assert max_rel_err(_logits(swapped), _logits(clean_b)) < FP32_ROUNDING
    assert type(swapped.model.layers[0].mlp.up_proj) is torch.nn.Linear  # B does not cover it
    assert isinstance(swapped.model.layers[0].self_attn.q_proj, FusedBTTLinear)
    assert {n for n, p in swapped.named_parameters() if p.requires_grad} == {
        n for n, p in clean_b.named_parameters() if p.requires_grad
    }


# 5. Merging under autocast --------------------------------------------------------------------


def test_merges_run_at_the_cores_precision_inside_autocast(trained_autocast, tmp_path):
    model, _ = trained_autocast
    name = "model.layers.0.mlp.down_proj"
    exact = model.get_submodule(name).to_linear().weight.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        streamed = dict(merged_named_weights(model))[f"{name}.weight"]
        save_merged(model, tmp_path / "merged")
        merged = merge_fura(copy.deepcopy(model)).get_submodule(name).weight
    for weight in (streamed, merged):
        assert max_rel_err(weight, exact) < 1e-6
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_rel_err(_logits(reloaded), _logits(model)) < FP32_ROUNDING


# 6. Sharded resume ----------------------------------------------------------------------------


def test_a_sharded_resume_keeps_the_trained_biases(tmp_path):
    """The merged bias lands in another shard than its weight: the bias-only shard is checked and
    consumed like the weight, never copied over the fp32 trained bias."""
    model = tiny_llama(seed=0).to(torch.bfloat16)
    convert_to_fura(model, "all-linear", progress=False)
    _train_autocast(model, steps=2)
    model.save_pretrained(tmp_path, max_shard_size="8KB")  # a 64 x 64 bf16 weight fills a shard
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map["model.layers.0.self_attn.q_proj.bias"] != weight_map["model.layers.0.self_attn.q_proj.weight"]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    resumed = tiny_llama(seed=0).to(torch.bfloat16)
    load_fura_adapter(resumed, tmp_path / ADAPTER_SUBDIR, progress=False)
    load_sharded_checkpoint(resumed, tmp_path, strict=False)
    for name, value in resumed.named_parameters():
        if name in trained:
            assert torch.equal(value, trained[name]), name


# 7. save_pretrained(push_to_hub=True) ----------------------------------------------------------


def test_push_to_hub_uploads_the_adapter_too(tmp_path, monkeypatch):
    """The Hub calls are the only thing replaced: what would be uploaded is recorded."""
    from transformers.utils import PushToHubMixin

    uploaded = []

    class Repo:
        repo_id = "user/tiny-fura"

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return Repo()

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded.extend(
            sorted(str(p.relative_to(working_dir)) for p in __import__("pathlib").Path(working_dir).rglob("*"))
        )

    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: Api())
    monkeypatch.setattr("transformers.modeling_utils.hf_api", lambda: Api())
    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload)
    model = tiny_llama(seed=0)
    convert_to_fura(model, ["q_proj"], progress=False)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="user/tiny-fura")
    assert f"{ADAPTER_SUBDIR}/{ADAPTER_WEIGHTS}" in uploaded and f"{ADAPTER_SUBDIR}/{ADAPTER_CONFIG}" in uploaded
    assert (tmp_path / "out" / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file()


# 8. A stale adapter beside newer weights ------------------------------------------------------


def test_no_stale_adapter_is_left_beside_newer_weights(tmp_path):
    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", progress=False)
    train_causal_lm(model, steps=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_SUBDIR).is_dir()
    train_causal_lm(model, steps=2, seed=5)
    merge_fura(model)
    model.save_pretrained(tmp_path)  # the merged model: no adapter belongs to these weights
    assert not (tmp_path / ADAPTER_SUBDIR).exists()


def test_save_merged_removes_an_adapter_left_in_the_folder(trained_autocast, tmp_path):
    model, _ = trained_autocast
    model.save_pretrained(tmp_path)
    save_merged(model, tmp_path)
    assert not (tmp_path / ADAPTER_SUBDIR).exists()


def test_the_loader_tells_an_adapter_from_other_weights_beside_it(tmp_path):
    """A save that stopped between its two writes (here: the weights rewritten, the old adapter
    copied back) leaves a pair the loader refuses, naming the folder."""
    import shutil

    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", progress=False)
    model.save_pretrained(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt" / ADAPTER_SUBDIR, tmp_path / "old")
    train_causal_lm(model, steps=2)
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / ADAPTER_SUBDIR)
    shutil.copytree(tmp_path / "old", tmp_path / "ckpt" / ADAPTER_SUBDIR)
    fresh = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="does not belong to the weights beside it"):
        load_fura_adapter(fresh, tmp_path / "ckpt" / ADAPTER_SUBDIR, progress=False)
    assert not any(isinstance(m, FusedBTTLinear) for m in fresh.modules())


# 9. Trainer(load_best_model_at_end=True) ------------------------------------------------------


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Batches(Dataset):
        def __init__(self, seed):
            self.ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", progress=False)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, per_device_train_batch_size=4,
        learning_rate=1e-2, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Batches(0), eval_dataset=Batches(1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # eval loss on held-out random tokens rises
    reference = AutoModelForCausalLM.from_pretrained(best).eval()
    assert max_rel_err(_logits(model.eval()), _logits(reference)) < FP32_ROUNDING


# The resume check's rounding ------------------------------------------------------------------


def test_a_merge_rounded_from_fp64_is_accepted_on_resume(trained_autocast):
    """One rounding of tolerance, as promised: an fp64 merge of the same cores rounded to fp32
    (what another device may write) is the layer's own merge."""
    model, _ = trained_autocast
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    state64 = {k: v.double() if v.is_floating_point() else v for k, v in layer.state_dict().items()}
    rounded = layer.dense_weight(state64).float()
    ours = layer.to_linear().weight
    assert 0 < (rounded - ours).abs().max() < 1e-6  # not bit-equal, but one fp32 rounding away
    model.load_state_dict({f"{name}.weight": rounded}, strict=False)
    with pytest.raises(ValueError, match="differs from the layer's own"):  # one training step away is not
        model.load_state_dict({f"{name}.weight": rounded + 1e-4 * rounded.abs().max()}, strict=False)


# 10. torch.func -------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev", "per-sample-grad"])
def test_torch_func_transforms_raise_a_clear_error_naming_the_layer(transform, quantize):
    model = tiny_llama(seed=0, hidden_size=128, intermediate_size=256)
    convert_to_fura(model, ["q_proj"], quantize=quantize, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 128)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi.unsqueeze(0),)).sum()

    run = {
        "vmap": lambda: torch.func.vmap(layer)(x),
        "grad": lambda: torch.func.grad(lambda xi: layer(xi).sum())(x),
        "jacrev": lambda: torch.func.jacrev(layer)(x),
        "per-sample-grad": lambda: torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x),
    }[transform]
    with pytest.raises(NotImplementedError, match="'model.layers.0.self_attn.q_proj': torch.func transforms"):
        run()
    torch.testing.assert_close(layer(x), layer(x))  # the layer still works outside the transform


# Unclear errors -------------------------------------------------------------------------------


def test_a_model_partly_on_meta_is_refused_by_name():
    model = tiny_llama(seed=0)
    model.model.layers[1].mlp.down_proj.to("meta")
    with pytest.raises(ValueError, match="layers \\['model.layers.1.mlp.down_proj'\\] are on the meta device"):
        convert_to_fura(model, "all-linear", progress=False)
    assert not any(isinstance(m, FusedBTTLinear) for m in model.modules())


def test_gpt2_conv1d_layers_are_named_when_nothing_matches():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="Conv1D layers \\(transformer.h.0.attn.c_attn, .*only nn.Linear"):
        convert_to_fura(model, "all-linear", progress=False)


def test_an_exclusion_that_matches_nothing_warns():
    model = tiny_llama(seed=0)
    with pytest.warns(UserWarning, match="exclude_modules='down_proj' matches no module.*\\['down_proj'\\]"):
        convert_to_fura(model, "all-linear", exclude_modules="down_proj", progress=False)
    quiet = tiny_llama(seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_fura(quiet, "all-linear", exclude_modules=["down_proj"], progress=False)
    assert type(quiet.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_an_adapter_loads_onto_a_converted_model_cast_to_bf16(trained_autocast):
    """It used to blame "another SVD basis": the bf16 core is the same core, rounded."""
    model, directory = trained_autocast
    target = tiny_llama(seed=0)
    convert_to_fura(target, "all-linear", progress=False)
    target.to(torch.bfloat16)
    load_fura_adapter(target, directory, progress=False)
    reference = copy.deepcopy(model).to(torch.bfloat16)
    assert max_rel_err(_logits(target), _logits(reference)) < 2**-7


def test_qfura_reports_its_nf4_error_after_a_state_dict_round_trip():
    from fura_kernels import QFusedBTTLinear

    model = tiny_llama(seed=0, hidden_size=128, intermediate_size=256)
    convert_to_fura(model, ["q_proj"], quantize="nf4", progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    rebuilt = QFusedBTTLinear(128, 128, bias=True, config=layer.config, module_name=layer.module_name,
                              model_config=model.config)  # fmt: skip
    rebuilt.load_state_dict(layer.state_dict())
    assert 0.05 < rebuilt.nf4_relative_error == layer.nf4_relative_error < 0.2


def test_an_adapter_saved_again_into_a_folder_with_other_files(trained_autocast, tmp_path):
    """The VLM recipe keeps its projector beside the adapter: a second save replaces the two
    adapter files and leaves the rest, and no temporary folder is left behind."""
    model, _ = trained_autocast
    save_fura_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "projector.safetensors").write_bytes(b"kept")
    save_fura_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(
        [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "projector.safetensors"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    load_fura_adapter(tiny_llama(seed=0), tmp_path / "adapter", progress=False)
