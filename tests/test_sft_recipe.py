"""The SFT recipe end to end on the CPU with a tiny Llama, for every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fura_kernels import load_fura_adapter
from fura_kernels.recipes import sft
from fura_kernels.recipes.tiny_model import make_tiny_llama, shipped_data_path

from .helpers import max_rel_err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _run(model_dir, out, method, *extra):
    return sft.main(["--model", str(model_dir), "--output-dir", str(out), "--method", method, "--max-steps", "10",
                     "--lr", "5e-3", "--eval-steps", "5", "--batch-size", "4", "--no-progress", *extra])  # fmt: skip


@pytest.mark.parametrize("method", ["fura", "lora", "full", "qfura", "qlora"])
def test_recipe_trains_and_saves(tiny_model_dir, tmp_path, method):
    if method.startswith("q"):
        pytest.importorskip("bitsandbytes")
    extra = ["--merge"] if method in ("fura", "lora") else []
    metrics = _run(tiny_model_dir, tmp_path, method, *extra)
    evals = [e["loss"] for e in metrics["eval_loss"]]
    assert [e["step"] for e in metrics["eval_loss"]] == [0, 5, 10]
    assert evals[-1] < evals[0] - 0.1, evals  # the held-out loss falls
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == method
    for path in metrics["outputs"].values():
        assert any(p.suffix in (".safetensors", ".json") for p in Path(path).iterdir())


def test_fura_adapter_and_merged_model_agree(tiny_model_dir, tmp_path):
    metrics = _run(tiny_model_dir, tmp_path, "fura", "--merge")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("### Instruction:\nIs the sun a star?", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_fura_adapter(base, metrics["outputs"]["adapter"], progress=False)
    merged = AutoModelForCausalLM.from_pretrained(metrics["outputs"]["merged"]).eval()
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        adapted, via_merge, original = base(ids).logits, merged(ids).logits, untouched(ids).logits
    assert max_rel_err(adapted, via_merge) < 1e-5
    assert max_rel_err(adapted, original) > 1e-3  # training changed the model


def test_prompt_tokens_are_masked(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = sft.load_examples(shipped_data_path())[0]
    item = sft.tokenize(tokenizer, example, 512)
    prompt_len = 1 + len(tokenizer(sft.format_prompt(example), add_special_tokens=False)["input_ids"])
    assert item["labels"][:prompt_len] == [sft.IGNORE_INDEX] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    assert sft.format_prompt(example).startswith("Below is an instruction that describes a task.")


def test_bad_data_and_unsupported_merge(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="needs 'instruction' and 'output'"):
        sft.load_examples(bad)
    with pytest.raises(SystemExit, match="--merge with --method qlora is not supported"):
        _run(tiny_model_dir, tmp_path / "q", "qlora", "--merge")


def test_bf16_autocast_checkpointing_and_accumulation(tiny_model_dir, tmp_path):
    metrics = _run(tiny_model_dir, tmp_path, "fura", "--bf16", "--gradient-checkpointing", "--grad-accum", "2")
    evals = [e["loss"] for e in metrics["eval_loss"]]
    assert evals[-1] < evals[0] - 0.1, evals
    # trainable tensors stay fp32 under bf16 autocast
    from safetensors.torch import load_file

    tensors = load_file(str(Path(metrics["outputs"]["adapter"]) / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fura", "qfura"])
def test_compile_trains_like_eager(tiny_model_dir, tmp_path, method):
    """`--compile` trains the model under torch.compile (accelerate's dynamo plugin; aot_eager on
    the CPU): the same losses as the eager run, step by step."""
    if method == "qfura":
        pytest.importorskip("bitsandbytes")
    torch._dynamo.reset()
    eager = _run(tiny_model_dir, tmp_path / "eager", method)
    torch._dynamo.utils.counters.clear()
    compiled = _run(tiny_model_dir, tmp_path / "compiled", method, "--compile", "--compile-backend", "aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert [e["loss"] for e in compiled["train_loss"]] == pytest.approx([e["loss"] for e in eager["train_loss"]],
                                                                        rel=1e-5)  # fmt: skip


def test_compile_options_need_compile(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--compile-backend 'aot_eager' needs --compile"):
        _run(tiny_model_dir, tmp_path, "fura", "--compile-backend", "aot_eager")
