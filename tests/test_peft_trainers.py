"""FuRA's PEFT form where fine-tuners run it: TRL's SFTTrainer and GRPOTrainer with
`peft_config=FuRAPeftConfig(...)`, and the recipes' `--peft-form` flag, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fura_kernels.peft import FuRALinear, FuRAPeftConfig
from fura_kernels.recipes import grpo, sft
from fura_kernels.recipes.tiny_model import make_tiny_llama

from .helpers import max_rel_err

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64)


def _fura_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".fura_" in n}


def _assert_trained_fura(trainer, before=None):
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, PeftModel)
    layers = [m for m in model.modules() if isinstance(m, FuRALinear)]
    assert layers and all(m.fura_R["default"].dtype == torch.float32 for m in layers)
    after = _fura_tensors(model)
    assert set(after) == set(before or after)
    if before is not None:
        assert any(not torch.equal(after[n], before[n]) for n in after)
    return model


def test_sft_trainer_with_a_fura_peft_config(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [f"question {i}: what is {i} plus {i}? answer: {2 * i}" for i in range(16)]
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                           learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                           disable_tqdm=True)  # fmt: skip
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config,
        train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts]),
        processing_class=tokenizer,
        peft_config=FuRAPeftConfig(target_modules=TARGETS, task_type="CAUSAL_LM", progress_bar=False),
    )
    before = _fura_tensors(trainer.model)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2]
    model = _assert_trained_fura(trainer, before)
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=model.get_base_model().dtype)  # as TRL loaded it
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = tokenizer(texts[:2], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # TRL trained (and wrapped) in bf16 autocast
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_grpo_trainer_with_a_fura_peft_config(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    args = grpo.parse_args(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--max-steps", "2",
                            "--prompts-per-step", "2", "--num-generations", "2", "--micro-batch", "4",
                            "--max-completion-length", "8", "--lr", "1e-2", "--cpu", "--no-progress"])  # fmt: skip
    problems = grpo.load_problems(grpo.shipped_math_path())[:8]

    def shaped(completions, **_):  # a random model earns no boxed answer: a shaped reward moves the weights
        return [0.1 * (len(str(c)) % 7) for c in completions]

    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=shaped,
        args=grpo.grpo_config(args),
        train_dataset=datasets.Dataset.from_list(problems),
        processing_class=tokenizer,
        peft_config=FuRAPeftConfig(target_modules=TARGETS, task_type="CAUSAL_LM", progress_bar=False),
    )
    before = _fura_tensors(trainer.model)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "reward" in e] == [1, 2]
    _assert_trained_fura(trainer, before)


def test_sft_recipe_peft_form_trains_saves_and_merges(tiny_model_dir, tmp_path):
    metrics = sft.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--method", "fura",
                        "--peft-form", "--max-steps", "6", "--lr", "5e-3", "--eval-steps", "3", "--batch-size", "4",
                        "--no-progress", "--merge"])  # fmt: skip
    evals = [e["loss"] for e in metrics["eval_loss"]]
    assert evals[-1] < evals[0], evals
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FURA"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert max_rel_err(reloaded(ids).logits, merged(ids).logits) <= 1e-5


def test_qfura_peft_form_is_fura_on_a_qlora_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    metrics = sft.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--method", "qfura",
                        "--peft-form", "--target-modules", "q_proj", "v_proj", "--max-steps", "2", "--lr", "5e-3",
                        "--eval-steps", "2", "--batch-size", "4", "--no-progress"])  # fmt: skip
    assert metrics["outputs"]["adapter"]
    with pytest.raises(SystemExit, match="--merge with --method qfura --peft-form"):
        sft.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "x"), "--method", "qfura",
                  "--peft-form", "--merge"])  # fmt: skip
    with pytest.raises(SystemExit, match="--peft-form applies to --method fura or qfura"):
        sft.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "x"), "--method", "lora",
                  "--peft-form"])  # fmt: skip


def test_grpo_recipe_peft_form_uses_peft_s_own_weight_sync(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "boxed_answer_reward", _shaped_reward)
    metrics = grpo.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--method", "fura",
                         "--peft-form", "--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "2",
                         "--micro-batch", "4", "--max-completion-length", "8", "--lr", "1e-2", "--cpu",
                         "--no-progress"])  # fmt: skip
    assert metrics["peft_form"] and [r["step"] for r in metrics["reward"]] == [1, 2]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "FURA"


def _shaped_reward(completions, answer, **_):
    return [0.1 * (len(str(c)) % 7) for c in completions]


_shaped_reward.__name__ = "boxed_answer_reward"


def test_trl_vllm_weight_sync_pushes_merged_base_names_and_unmerges(tiny_model_dir):
    """TRL's vLLM path for a PEFT model (`VLLMGeneration._iter_named_params`: merge_adapter, push
    every parameter under the base's name, skipping the method's own by its prefix, then
    unmerge_adapter), run as TRL runs it; vLLM itself needs a GPU, so its receiving end is a dict."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from trl.generation.vllm_generation import VLLMGeneration

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_names = {n for n, _ in base.named_parameters()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      _saved_adapter(tiny_model_dir), is_trainable=True)  # fmt: skip
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    generation = SimpleNamespace(
        model=model,
        _dist=SimpleNamespace(gather_params=lambda params: nullcontext(), is_fsdp=False),  # fmt: skip
        _fix_param_name_to_vllm=lambda name, extra_prefixes=(): name,
    )
    pushed = {name: tensor.clone() for name, tensor in VLLMGeneration._iter_named_params(generation)}
    assert set(pushed) == base_names  # the base's names only: no fura_ tensor, no base_layer
    merged = _merged(tiny_model_dir)
    for name, tensor in merged.named_parameters():
        assert max_rel_err(pushed[name], tensor) <= 1e-5, name
    with torch.no_grad():
        assert max_rel_err(model(ids).logits, before) <= 1e-5  # unmerged again, training goes on


_ADAPTERS: dict = {}


def _saved_adapter(model_dir):
    """A FuRA adapter trained 2 steps on the tiny model, saved once per session."""
    if model_dir not in _ADAPTERS:
        from peft import get_peft_model

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               FuRAPeftConfig(target_modules=TARGETS, progress_bar=False))  # fmt: skip
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        data = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=data, labels=data).loss.backward()
            opt.step()
        directory = model_dir.parent / "fura-peft-adapter"
        model.save_pretrained(directory)
        _ADAPTERS[model_dir] = directory
    return _ADAPTERS[model_dir]


def _merged(model_dir):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), _saved_adapter(model_dir))
    return model.merge_and_unload()
