"""The reference's knobs: one decomposition mode per module group, and the core normalisation
after each optimiser step, against float64 definitions written from the reference
(`fura/btt_layer.py`: `resolve_blocktt_decomp_modes`, `normalize_trainable_blocktt_cores_`)."""

from __future__ import annotations

import pytest
import torch

from fura_kernels import FuRAConfig, FusedBTTLinear, convert_to_fura, load_fura_adapter, reference, save_fura_adapter
from fura_kernels.config import DECOMP_GROUPS
from fura_kernels.training import normalize_callback, normalize_cores_after_step, normalize_trainable_cores_
from tests.helpers import DTYPE_IDS, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RL_ABLATION = "{qkv:input,o:output,mlp_upgate:output,mlp_down:output}"  # as the reference's run_rl.sh writes it


@pytest.mark.parametrize(
    "given",
    [
        RL_ABLATION,
        '{"qkv": "input_one_block", "o": "output_one_block", "mlp_upgate": "output", "mlp_down": "output"}',
        "{'qkv': 'input', 'o': 'output', 'up_gate': 'output', 'mlp_down': 'output_block'}",
        {"qkv": "input", "o": "output", "mlp_up_gate": "output", "mlp_down": "output"},
    ],
    ids=["bare", "json", "python", "dict"],
)
def test_group_mappings_parse_with_the_references_names_and_aliases(given):
    config = FuRAConfig(decomp_mode=given)
    assert config.decomp_mode == {
        "qkv": "input_one_block",
        "o": "output_one_block",
        "mlp_upgate": "output_one_block",
        "mlp_down": "output_one_block",
    }
    assert FuRAConfig(**config.to_dict()) == config  # what an adapter file stores reads back


def test_a_group_left_out_gets_the_references_default_and_layers_follow_their_group():
    config = FuRAConfig(decomp_mode={"o": "output"})
    assert config.decomp_mode == {"qkv": "input_one_block", "o": "output_one_block",
                                  "mlp_upgate": "input_one_block", "mlp_down": "input_one_block"}  # fmt: skip
    for group, leaves in DECOMP_GROUPS.items():
        for leaf in leaves:
            assert config.decomp_mode_for(f"model.layers.3.x.{leaf}") == config.decomp_mode[group]
    assert FuRAConfig(decomp_mode="output").decomp_mode == "output_one_block"


@pytest.mark.parametrize(
    "given,match",
    [
        ("{qkv:square}", r"decomp_mode\['qkv'\]: expected one of \('output_one_block', 'input_one_block'\)"),
        ("{attn:input}", "unknown group 'attn'"),
        ("{qkv:", "is not a dictionary"),
        ("columns", "expected one of"),
    ],
)
def test_bad_mappings_are_refused_by_name(given, match):
    with pytest.raises(ValueError, match=match):
        FuRAConfig(decomp_mode=given)


def test_a_layer_in_no_group_is_refused_before_anything_changes():
    model = tiny_llama(seed=0)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.fc': .* 'fc' is in no group"):
        FuRAConfig(decomp_mode=RL_ABLATION).decomp_mode_for("model.layers.0.mlp.fc")
    with pytest.raises(ValueError, match="is in no group"):
        convert_to_fura(model, ["q_proj", "lm_head"], FuRAConfig(decomp_mode=RL_ABLATION), progress=False)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_each_layer_is_cut_by_its_groups_mode_and_reconstructs_its_weight_in_float64():
    """q/k/v one block over the input (m heads x head_dim rows), o and the MLP one block over the
    output: the block grids the reference gives these modes, and every layer's cores rebuild its
    dense weight (float64 einsum of `fura_kernels.reference`)."""
    model = tiny_llama(seed=1)
    weights = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    config = FuRAConfig(decomp_mode=RL_ABLATION, svd_dtype=torch.float64)
    convert_to_fura(model, TARGETS, config, progress=False)
    cfg = model.config
    for name, layer in model.named_modules():
        if not isinstance(layer, FusedBTTLinear):
            continue
        shape, leaf = layer.block_shape, name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj"):
            heads = cfg.num_attention_heads if leaf == "q_proj" else cfg.num_key_value_heads
            assert (shape.m, shape.n) == (heads, 1), name  # input_one_block, output cut by head
        else:
            assert shape.m == 1 and shape.n > 1, name  # output_one_block
        assert f"mode={config.decomp_mode_for(name)}" in repr(layer)
        dense = reference.dense_weight(layer.btt_l.double(), layer.btt_r.double(),
                                       None if layer.btt_s is None else layer.btt_s.double())  # fmt: skip
        assert (dense - weights[name]).abs().max() <= 1e-6 * weights[name].abs().max(), name  # fp32 cores


def test_a_per_group_adapter_saves_and_loads_onto_a_fresh_base(tmp_path):
    model = tiny_llama(seed=2)
    convert_to_fura(model, TARGETS, FuRAConfig(decomp_mode=RL_ABLATION), progress=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        trained = model(ids).logits
    save_fura_adapter(model, tmp_path / "adapter")
    fresh = load_fura_adapter(tiny_llama(seed=2), tmp_path / "adapter", progress=False)
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, trained, atol=1e-5)
    assert fresh.model.layers[0].self_attn.q_proj.config.decomp_mode["qkv"] == "input_one_block"


# ----------------------------------------------------------------------------------------------
# normalize_trainable_cores_


def _unit_over(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The reference's definition in float64: every vector along `dim` divided by its norm."""
    t = t.detach().double()
    return t / torch.linalg.vector_norm(t, dim=dim, keepdim=True).clamp_min(1e-12)


def _scrambled(model) -> None:
    """Move every trained tensor off the unit sphere, as optimiser steps do."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + torch.rand_like(p)).add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("position", ["small", "large", "both"])
def test_trained_cores_become_unit_vectors_over_their_block_dimension(position, dtype):
    """R (n, b, m*r) over b, a trained L (m, n*r, a) over a; frozen cores, S and biases untouched."""
    model = tiny_llama(seed=3)
    config = FuRAConfig(train_position=position, trainable_dtype=dtype,
                        s_merged_to="split" if position == "both" else "keep_trainable")  # fmt: skip
    convert_to_fura(model, TARGETS, config, progress=False)
    _scrambled(model)
    layers = [m for m in model.modules() if isinstance(m, FusedBTTLinear)]
    before = {id(layer): {n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers}
    counts = normalize_trainable_cores_(model)
    assert counts["normalized_right_cores"] == sum(layer.btt_r.requires_grad for layer in layers)
    assert counts["normalized_left_cores"] == sum(layer.btt_l.requires_grad for layer in layers)
    assert counts["normalized_right_cores"] + counts["normalized_left_cores"] > 0
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8}[dtype]
    for layer in layers:
        old = before[id(layer)]
        for name, p in layer.named_parameters():
            dim = {"btt_r": 1, "l_core.btt_l": 2}.get(name)
            if dim is not None and p.requires_grad:
                expected = _unit_over(old[name], dim)
                assert (p.double() - expected).abs().max() <= tol * expected.abs().max(), name
                assert not torch.allclose(old[name].double(), expected, atol=1e-3)  # it did change something
            else:
                assert torch.equal(p, old[name]), name


def test_the_peft_form_and_qfura_normalise_their_trained_r():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from fura_kernels.peft import FuRAPeftConfig

    peft_model = get_peft_model(tiny_llama(seed=4), FuRAPeftConfig(target_modules=TARGETS, progress_bar=False))
    _scrambled(peft_model)
    cores = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "fura_R" in n}
    assert normalize_trainable_cores_(peft_model)["normalized_right_cores"] == len(cores) > 0
    for name, p in peft_model.named_parameters():
        if name in cores:
            assert torch.allclose(p.double(), _unit_over(cores[name], 1), atol=1e-6)

    qmodel = tiny_llama(seed=4)
    convert_to_fura(qmodel, ["o_proj", "gate_proj"], quantize="nf4", progress=False)
    _scrambled(qmodel)
    counts = normalize_trainable_cores_(qmodel)
    assert counts == {"normalized_left_cores": 0, "normalized_right_cores": 2 * qmodel.config.num_hidden_layers}


def _norms_are_one(model) -> bool:
    return all(
        torch.allclose(torch.linalg.vector_norm(m.btt_r.detach(), dim=1), torch.ones(()), atol=1e-5)
        for m in model.modules()
        if isinstance(m, FusedBTTLinear)
    )


def test_the_step_hook_normalises_after_every_optimizer_step_and_can_be_removed():
    model = tiny_llama(seed=5)
    convert_to_fura(model, TARGETS, progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    handle = normalize_cores_after_step(optimizer, model)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        assert _norms_are_one(model)
        optimizer.zero_grad()
    handle.remove()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not _norms_are_one(model)


def test_the_trainer_callback_normalises_after_each_step_of_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(seed=6)
    convert_to_fura(model, TARGETS, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (8, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    seen = []

    class Probe(normalize_callback().__class__.__mro__[1]):  # a plain TrainerCallback
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(_norms_are_one(model))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=0.1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[normalize_callback(), Probe()]).train()
    assert seen == [True, True, True]
