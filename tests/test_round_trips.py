"""A converted model survives every way users save and reload it, or refuses with an error.

The three round trips of a trained, converted tiny Llama (fp32, logits to 1e-5 relative):
`save_pretrained` -> `AutoModelForCausalLM.from_pretrained`; the adapter -> a fresh base; the
adapter -> an already-converted base. Plus the paths that used to reload wrong with no error.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fura_kernels import FusedBTTLinear, QFusedBTTLinear, convert_to_fura, load_fura_adapter, save_fura_adapter
from fura_kernels.adapters import ADAPTER_CONFIG, ADAPTER_SUBDIR, ADAPTER_WEIGHTS

from .helpers import max_rel_err, tiny_llama, train_causal_lm

TOLERANCE = 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained():
    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", progress=False)
    train_causal_lm(model, steps=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    return model, ids


def _converted_base(seed=0):
    model = tiny_llama(seed=seed)
    convert_to_fura(model, "all-linear", progress=False)
    return model


def _trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_save_pretrained_reloads_as_the_trained_model(trained, tmp_path):
    model, ids = trained
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert not any("btt_" in k or "l_core" in k for k in weights)  # the base's own names only
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # and its dtype
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, FusedBTTLinear) for m in reloaded.modules())
    assert max_rel_err(_logits(reloaded, ids), _logits(model, ids)) <= TOLERANCE
    assert any(isinstance(m, FusedBTTLinear) for m in model.modules())  # the live model is unchanged


def test_save_pretrained_writes_the_adapter_beside_it(trained, tmp_path):
    model, ids = trained
    model.save_pretrained(tmp_path)
    adapter = tmp_path / ADAPTER_SUBDIR
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    fresh = tiny_llama(seed=0)
    load_fura_adapter(fresh, adapter, progress=False)
    assert max_rel_err(_logits(fresh, ids), _logits(model, ids)) <= TOLERANCE
    assert _trainable_state(fresh).keys() == _trainable_state(model).keys()


def test_save_pretrained_merges_a_state_dict_passed_in(trained, tmp_path):
    """HF Trainer passes the full state dict under FSDP and DeepSpeed: it is merged too."""
    model, ids = trained
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_rel_err(_logits(reloaded, ids), _logits(model, ids)) <= TOLERANCE
    assert (tmp_path / ADAPTER_SUBDIR / ADAPTER_WEIGHTS).is_file()


def test_trainer_save_model_reloads_as_the_trained_model(trained, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, ids = trained
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    Trainer(model=model, args=args).save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert max_rel_err(_logits(reloaded, ids), _logits(model, ids)) <= TOLERANCE


def test_adapter_onto_a_fresh_base(trained, tmp_path):
    model, ids = trained
    save_fura_adapter(model, tmp_path)
    fresh = tiny_llama(seed=0)
    load_fura_adapter(fresh, tmp_path, progress=False)
    assert max_rel_err(_logits(fresh, ids), _logits(model, ids)) <= TOLERANCE


def test_adapter_onto_an_already_converted_base(trained, tmp_path):
    model, ids = trained
    save_fura_adapter(model, tmp_path)
    converted = _converted_base()
    layers_before = {n: m for n, m in converted.named_modules() if isinstance(m, FusedBTTLinear)}
    assert max_rel_err(_logits(converted, ids), _logits(model, ids)) > 1e-3  # not trained yet
    load_fura_adapter(converted, tmp_path, progress=False)
    assert max_rel_err(_logits(converted, ids), _logits(model, ids)) <= TOLERANCE
    # loaded in place: the same layer objects, so an optimiser built on them keeps working
    assert all(converted.get_submodule(n) is m for n, m in layers_before.items())


def test_swapping_adapters_on_a_converted_model(trained, tmp_path):
    model, ids = trained
    save_fura_adapter(model, tmp_path / "a")
    other = _converted_base()
    train_causal_lm(other, steps=3, seed=5)
    logits_b = _logits(other, ids)
    save_fura_adapter(other, tmp_path / "b")
    load_fura_adapter(other, tmp_path / "a", progress=False)
    assert max_rel_err(_logits(other, ids), _logits(model, ids)) <= TOLERANCE
    load_fura_adapter(other, tmp_path / "b", progress=False)  # and back
    assert max_rel_err(_logits(other, ids), logits_b) <= TOLERANCE


def test_adapter_onto_a_model_converted_from_another_base_is_refused(trained, tmp_path):
    model, ids = trained
    save_fura_adapter(model, tmp_path)
    other = _converted_base(seed=9)
    before = _trainable_state(other)
    with pytest.raises(ValueError, match="FuRA layer 'model.layers.0.self_attn.q_proj' was converted from another"):
        load_fura_adapter(other, tmp_path, progress=False)
    after = _trainable_state(other)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_onto_a_model_converted_with_another_config_is_refused(trained, tmp_path):
    model, _ = trained
    save_fura_adapter(model, tmp_path)
    other = tiny_llama(seed=0)
    from fura_kernels import FuRAConfig

    convert_to_fura(other, "all-linear", FuRAConfig(train_bias=False), progress=False)
    with pytest.raises(ValueError, match="was converted with FuRAConfig\\(.*train_bias=False"):
        load_fura_adapter(other, tmp_path, progress=False)


def test_a_failed_in_place_load_restores_every_tensor(trained, tmp_path, monkeypatch):
    """A failure after some layers were written (here: the last copy) puts every tensor back."""
    model, _ = trained
    save_fura_adapter(model, tmp_path)
    converted = _converted_base()
    before = _trainable_state(converted)
    bias = converted.model.layers[1].self_attn.o_proj.bias  # late in the load order
    calls = {"n": 0}
    original_copy = torch.Tensor.copy_

    def failing_copy(self, src, *args, **kwargs):
        if self is bias and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("simulated failure")
        return original_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="simulated failure"):
        load_fura_adapter(converted, tmp_path, progress=False)
    monkeypatch.undo()
    after = _trainable_state(converted)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resuming_from_a_merged_checkpoint_needs_the_adapter_first(trained, tmp_path):
    """HF Trainer resumes with `load_state_dict(state_dict, strict=False)`: merged weights loaded
    into a converted model used to be dropped behind a warning, keeping untrained cores."""
    model, ids = trained
    model.save_pretrained(tmp_path)
    merged = load_file(str(tmp_path / "model.safetensors"))
    resumed = _converted_base()
    with pytest.raises(ValueError, match="q_proj'.*merged weight.*load_fura_adapter"):
        resumed.load_state_dict(merged, strict=False)
    load_fura_adapter(resumed, tmp_path / ADAPTER_SUBDIR, progress=False)
    result = resumed.load_state_dict(merged, strict=False)  # now consistent: accepted, keys consumed
    assert not [k for k in result.unexpected_keys if k.endswith("proj.weight")]
    assert max_rel_err(_logits(resumed, ids), _logits(model, ids)) <= TOLERANCE


def test_qfura_save_pretrained_reloads_as_the_qfura_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_llama(seed=1, hidden_size=128, intermediate_size=256)
    convert_to_fura(model, "all-linear", quantize="nf4", progress=False)
    train_causal_lm(model, steps=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_rel_err(_logits(reloaded, ids), _logits(model, ids)) <= TOLERANCE
    converted = tiny_llama(seed=1, hidden_size=128, intermediate_size=256)
    convert_to_fura(converted, "all-linear", quantize="nf4", progress=False)
    load_fura_adapter(converted, tmp_path / ADAPTER_SUBDIR, progress=False)
    assert isinstance(converted.model.layers[0].mlp.up_proj, QFusedBTTLinear)
    assert max_rel_err(_logits(converted, ids), _logits(model, ids)) <= TOLERANCE


def test_a_pickled_converted_model_loads_and_still_saves_right(trained, tmp_path):
    """torch.save of the whole module (and multiprocessing, which pickles it): the FuRA-aware
    save_pretrained must survive pickling."""
    import io

    model, ids = trained
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert max_rel_err(_logits(loaded, ids), _logits(model, ids)) == 0
    loaded.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_rel_err(_logits(reloaded, ids), _logits(model, ids)) <= TOLERANCE
    assert (tmp_path / ADAPTER_SUBDIR / ADAPTER_WEIGHTS).is_file()
