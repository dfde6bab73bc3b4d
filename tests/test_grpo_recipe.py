"""The GRPO recipe through TRL on the CPU with a tiny Llama, for every method, and its reward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fura_kernels import FusedBTTLinear, convert_to_fura, load_fura_adapter
from fura_kernels.recipes import grpo
from fura_kernels.recipes.tiny_model import make_tiny_llama

pytest.importorskip("trl")
pytest.importorskip("math_verify")


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        ("so the total is \\boxed{62}.", "62", 1.0),
        ("first \\boxed{1} then \\boxed{\\frac{11}{8}}", "\\frac{11}{8}", 1.0),  # the last box counts
        ("\\boxed{1.375}", "\\frac{11}{8}", 1.0),  # equivalent, not equal strings
        ("\\boxed{\\sqrt{72}}", "6\\sqrt{2}", 1.0),
        ("\\boxed{\\frac{11}{8}} and finally \\boxed{2}", "\\frac{11}{8}", 0.0),
        ("the answer is 62", "62", 0.0),  # no box, no reward
        ("\\boxed{61}", "62", 0.0),
        ("\\boxed{6", "6", 0.0),  # unbalanced
    ],
)
def test_boxed_answer_reward(completion, answer, reward):
    assert grpo.boxed_answer_reward([completion], [answer]) == [reward]
    assert grpo.boxed_answer_reward([[{"role": "assistant", "content": completion}]], [answer]) == [reward]


def test_shipped_data_loads_into_prompts():
    records = grpo.load_problems(grpo.shipped_math_path())
    assert len(records) >= 30 and all("\\boxed{}" in r["prompt"] and r["answer"] for r in records)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64)


@pytest.fixture
def shaped_reward(monkeypatch):
    """The real reward, plus a small shaped term: a random model never writes a \\boxed answer, so
    every reward would be 0 and no advantage would move the weights. Records that the real one ran."""
    calls = []
    real = grpo.boxed_answer_reward

    def reward(completions, answer, **kwargs):
        base = real(completions, answer, **kwargs)
        calls.append((len(completions), base))
        return [b + 0.1 * (len(c) % 7) for b, c in zip(base, completions, strict=True)]

    reward.__name__ = "boxed_answer_reward"
    monkeypatch.setattr(grpo, "boxed_answer_reward", reward)
    return calls


def _run(model_dir, out, method, *extra):
    return grpo.main(["--model", str(model_dir), "--output-dir", str(out), "--method", method, "--max-steps", "2",
                      "--prompts-per-step", "2", "--num-generations", "2", "--micro-batch", "4",
                      "--max-completion-length", "8", "--lr", "1e-2", "--cpu", "--no-progress", *extra])  # fmt: skip


@pytest.mark.parametrize("method", ["fura", "qfura", "lora", "qlora", "full"])
def test_recipe_runs_two_steps_and_saves(tiny_model_dir, tmp_path, method, shaped_reward):
    if method.startswith("q"):
        pytest.importorskip("bitsandbytes")
    extra = ["--merge"] if method in ("fura", "lora") else []
    metrics = _run(tiny_model_dir, tmp_path, method, *extra)
    assert [r["step"] for r in metrics["reward"]] == [1, 2]  # rewards logged every step
    assert shaped_reward and all(n == 4 for n, _ in shaped_reward)  # 2 prompts x 2 rollouts, real reward ran
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == method
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if method in ("fura", "qfura"):
        # The adapter reloads onto a fresh base (its probe check proves the frozen core unchanged),
        # and its trained tensors moved away from the freshly converted ones.
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        convert_to_fura(fresh, grpo.DEFAULT_TARGETS, quantize="nf4" if method == "qfura" else None, progress=False)
        loaded = load_fura_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter",
                                   progress=False)  # fmt: skip
        moved = [n for n, p in loaded.named_parameters() if p.requires_grad
                 and not torch.equal(p, dict(fresh.named_parameters())[n])]  # fmt: skip
        assert moved and all(n.endswith(("btt_r", "btt_s", "bias")) for n in moved)
        assert any(isinstance(m, FusedBTTLinear) for m in loaded.modules())
    elif method in ("lora", "qlora"):
        tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())  # B starts at zero
    else:
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    if "--merge" in extra:  # frozen tensors stayed as they were
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_vllm_weight_sync_is_switched_to_merged_names(tiny_model_dir):
    """TRL's vLLM path syncs `vllm_generation._iter_named_params()`; the recipe points it at
    `merged_named_weights` (vLLM itself needs a GPU: only the wiring is tested here)."""
    from types import SimpleNamespace

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_keys = set(model.state_dict())
    convert_to_fura(model, grpo.DEFAULT_TARGETS, progress=False)
    generation = SimpleNamespace(_iter_named_params=lambda: iter(model.named_parameters()))
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              vllm_generation=generation)  # fmt: skip
    grpo.use_merged_weight_sync(trainer)
    names = {name for name, _ in trainer.vllm_generation._iter_named_params()}
    assert names == base_keys and not any("btt_" in n for n in names)


def test_a_run_that_earns_no_reward_says_why(tiny_model_dir, tmp_path, capsys):
    """The real reward on a random tiny model is 0 for every completion: the output says that
    GRPO therefore updated nothing, instead of looking like a run that works."""
    metrics = _run(tiny_model_dir, tmp_path, "fura")
    assert all(entry["reward"] == 0 for entry in metrics["reward"])
    out = capsys.readouterr().out
    assert "every completion earned reward 0, so every group advantage was 0 and GRPO updated nothing" in out
