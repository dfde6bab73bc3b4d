"""The reference's training set-ups as options of the SFT and GRPO recipes (tiny Llama, CPU):
the SVD baseline and its ablation, per-group decomposition, core normalisation, bf16 trainables,
PagedAdamW8bit, and the reference's LoRA / QLoRA baselines."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fura_kernels import FusedBTTLinear, load_fura_adapter
from fura_kernels.recipes import grpo, sft
from fura_kernels.recipes.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _sft(model_dir, out, method, *extra, steps="6"):
    return sft.main(["--model", str(model_dir), "--output-dir", str(out), "--method", method, "--max-steps", steps,
                     "--lr", "5e-3", "--eval-steps", steps, "--batch-size", "4", "--no-progress", *extra])  # fmt: skip


@pytest.mark.parametrize("random_basis", [False, True], ids=["svd", "svd-random-basis"])
def test_sft_svd_baseline_trains_and_saves_a_model_that_loads(tiny_model_dir, tmp_path, random_basis):
    extra = ["--svd-random-basis"] if random_basis else []
    metrics = _sft(tiny_model_dir, tmp_path, "svd", *extra, "--lr", "1e-3")
    evals = [e["loss"] for e in metrics["eval_loss"]]
    assert evals[-1] < evals[0], evals
    assert metrics["setup"]["svd_train_position"] == "output" and metrics["setup"]["svd_random_basis"] == random_basis
    trained = AutoModelForCausalLM.from_pretrained(metrics["outputs"]["model"])  # plain linears again
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer = trained.model.layers[0].mlp.down_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == base.model.layers[0].mlp.down_proj.weight.dtype
    assert not torch.allclose(layer.weight, base.model.layers[0].mlp.down_proj.weight, atol=1e-4)
    assert torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)  # frozen stays


def test_sft_fura_with_the_references_rl_knobs(tiny_model_dir, tmp_path):
    """Per-group decomposition, normalised cores after every step, bf16 trainables: the saved
    adapter reloads, and its trained R cores are unit vectors over their blocks."""
    metrics = _sft(tiny_model_dir, tmp_path, "fura", "--decomp-mode", "{qkv:input,o:output,mlp_upgate:output,"
                   "mlp_down:output}", "--normalize-cores", "--trainable-dtype", "bfloat16")  # fmt: skip
    assert metrics["setup"]["normalize_cores"] and metrics["setup"]["trainable_dtype"] == "bfloat16"
    model = load_fura_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), metrics["outputs"]["adapter"],
                              progress=False)  # fmt: skip
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FusedBTTLinear)}
    q, o = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.o_proj"]
    assert q.block_shape.n == 1 and q.block_shape.m > 1  # input_one_block for qkv
    assert o.block_shape.m == 1 and o.block_shape.n > 1  # output_one_block for o
    normalised = 0
    for layer in layers.values():
        for core, dim in ((layer.btt_r, 1), (layer.btt_l, 2)):
            if core.requires_grad:
                assert core.dtype == torch.bfloat16
                norms = torch.linalg.vector_norm(core.float(), dim=dim)
                assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
                normalised += 1
    assert normalised == len(layers)


@pytest.mark.parametrize("method,expected", [("lora", (64, 128, 0.05)), ("qlora", (48, 96, 0.05))])
def test_sft_reference_setup_runs_its_lora_baselines(tiny_model_dir, tmp_path, method, expected):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    metrics = _sft(tiny_model_dir, tmp_path, method, "--reference-setup", steps="2")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == expected
    assert metrics["setup"]["optim"] == ("paged_adamw_8bit" if method == "qlora" else "adamw")


def test_sft_reference_setup_for_qfura_uses_paged_adamw_8bit_and_bf16_trainables(tiny_model_dir, tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    built = []
    real = bnb.optim.PagedAdamW8bit

    def spy(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bnb.optim, "PagedAdamW8bit", spy)
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        metrics = _sft(tiny_model_dir, tmp_path, "qfura", "--reference-setup", steps="2")
    assert built == [{"lr": 5e-3, "betas": (0.9, 0.95), "weight_decay": 0.0}]
    assert metrics["setup"]["trainable_dtype"] == "bfloat16" and metrics["setup"]["optim"] == "paged_adamw_8bit"


@pytest.mark.parametrize(
    "method,extra,match",
    [
        ("lora", ["--normalize-cores"], "--normalize-cores applies to --method fura or qfura, not --method lora"),
        ("fura", ["--svd-random-basis"], "applies to --method svd, not --method fura"),
        ("lora", ["--trainable-dtype", "bfloat16"], "--trainable-dtype bfloat16 applies to"),
        ("fura", ["--peft-form", "--decomp-mode", "input"], "the transform form is output_one_block only"),
        ("fura", ["--decomp-mode", "{attn:input}"], "unknown group 'attn'"),
        ("full", ["--decomp-mode", "input"], "--decomp-mode applies to --method fura or qfura"),
    ],
)
def test_options_that_do_not_apply_are_refused_before_loading(tiny_model_dir, tmp_path, method, extra, match):
    with pytest.raises(SystemExit, match=match):
        _sft(tiny_model_dir, tmp_path / "never", method, *extra)
    assert not (tmp_path / "never").exists()


def _grpo(model_dir, out, method, *extra):
    return grpo.main(["--model", str(model_dir), "--output-dir", str(out), "--method", method, "--max-steps", "2",
                      "--prompts-per-step", "2", "--num-generations", "2", "--micro-batch", "4",
                      "--max-completion-length", "8", "--lr", "1e-2", "--cpu", "--no-progress", *extra])  # fmt: skip


def test_grpo_normalises_through_its_trainer_callback_and_runs_the_svd_baseline(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    # A random tiny model never earns the real reward; a shaped one makes the policy move.
    monkeypatch.setattr(grpo, "boxed_answer_reward", lambda completions, answer, **_: [0.1 * (len(c) % 7) for c in
                                                                                         completions])  # fmt: skip
    grpo.boxed_answer_reward.__name__ = "boxed_answer_reward"
    metrics = _grpo(tiny_model_dir, tmp_path / "fura", "fura", "--normalize-cores", "--reference-setup")
    assert metrics["setup"]["trainable_dtype"] == "bfloat16" and metrics["setup"]["normalize_cores"]
    model = load_fura_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "fura" / "adapter",
                              progress=False)  # fmt: skip
    for layer in (m for m in model.modules() if isinstance(m, FusedBTTLinear)):
        norms = torch.linalg.vector_norm(layer.btt_r.float(), dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)

    metrics = _grpo(tiny_model_dir, tmp_path / "svd", "svd", "--svd-random-basis")
    assert metrics["setup"]["svd_random_basis"] and metrics["trainable_params"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "svd" / "model")

    with pytest.raises(SystemExit, match="--method svd with --use-vllm"):
        _grpo(tiny_model_dir, tmp_path / "never", "svd", "--use-vllm")


def test_grpo_reference_setup_runs_the_references_rl_lora(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    metrics = _grpo(tiny_model_dir, tmp_path, "lora", "--reference-setup")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (32, 32, 0.0)
    assert metrics["setup"]["lora_r"] == 32
