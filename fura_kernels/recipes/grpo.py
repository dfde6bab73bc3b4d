"""GRPO on math with FuRA, QFuRA, LoRA, QLoRA, full fine-tuning or the SVD baseline, through TRL's `GRPOTrainer`.

    python -m fura_kernels.recipes.grpo --model PATH --output-dir OUT [--method fura] [--merge]
    accelerate launch -m fura_kernels.recipes.grpo --model PATH --output-dir OUT --bf16 --use-vllm

Data: JSON or JSONL records with `problem` and `answer` (a small set written for this project
ships as the default). Each prompt asks for the final answer in `\\boxed{}`; the reward is 1 when
the last `\\boxed{...}` of a completion is mathematically equivalent to the answer, as math-verify
judges it, else 0. Defaults are the FuRA reference's RL track where TRL can express them
(FURA_SPEC.md §10): 32 prompts x 8 rollouts per step, 50 steps, temperature 1, up to 1024 new
tokens, advantage = reward - group mean (no std), one policy update per batch (so the ratio is 1
and nothing is clipped), no KL term, AdamW lr 9e-5 (1e-5 for full fine-tuning), gradient
clipping 1.0, no schedule. `--loss reference` also takes the reference's per-sequence loss
aggregation (TRL's "grpo") instead of TRL's default.

With `--use-vllm` (GPU only, vLLM installed), TRL generates the rollouts in vLLM; for FuRA and
QFuRA the recipe makes TRL's weight sync push `merged_named_weights(model)`: the base
checkpoint's names, each layer merged on its own, which vLLM's `load_weights` accepts.

The reference's RL options (`fura_kernels.recipes.knobs`): `--decomp-mode` per module group,
`--normalize-cores` (a Trainer callback after every optimiser step), `--trainable-dtype bfloat16`,
`--method svd` (`--svd-random-basis`, lr 1e-4 as its script), and `--reference-setup` (its LoRA
baseline r=32, alpha=32, no dropout; bf16 trainables).
"""

from __future__ import annotations

import argparse
import os
import time
from importlib import resources
from pathlib import Path

import torch

from ..adapters import merged_named_weights
from ..model import convert_to_fura
from ..optional import check_installed
from ..training import normalize_callback
from .baselines import quantize_linears_bnb
from .common import (
    PEFT_FORM_HELP,
    RecipeInputError,
    add_compile_arguments,
    check_compile_arguments,
    check_method_flags,
    check_paths,
    fura_peft_model,
    read_json,
    run_main,
    save_outputs,
    trainer_compile_settings,
    write_metrics,
)
from .knobs import add_knob_arguments, apply_svd, fura_config, resolve_knobs, setup_record
from .sft import DEFAULT_TARGETS

METHODS = ("fura", "qfura", "lora", "qlora", "full", "svd")
PROMPT = "{problem}\nReason step by step, and put your final answer within \\boxed{{}}.\n"
# The reference's learning rates (FURA_SPEC.md §10): FuRA-style adapters 9e-5, full fine-tuning 1e-5,
# the SVD baseline 1e-4 (its run_rl.sh).
DEFAULT_LR = {"fura": 9e-5, "qfura": 9e-5, "lora": 9e-5, "qlora": 9e-5, "full": 1e-5, "svd": 1e-4}


def shipped_math_path() -> Path:
    """The small math set that ships with the recipe: `problem` / `answer` JSON lines."""
    return Path(str(resources.files("fura_kernels.recipes") / "data" / "math_tiny.jsonl"))


def load_problems(path: str | Path) -> list[dict]:
    """Records with `problem` and `answer` from a JSON list or a JSONL file."""
    records = read_json(path, "grpo", lines=True)
    if not isinstance(records, list) or not records:
        raise RecipeInputError(f"grpo: {path} must hold a non-empty list of records")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not {"problem", "answer"} <= set(record):
            raise RecipeInputError(f"grpo: record {i} of {path} needs 'problem' and 'answer'")
        if not isinstance(record["problem"], str):
            raise RecipeInputError(f"grpo: record {i} of {path}: 'problem' is {type(record['problem']).__name__}, "
                                   "expected a string")  # fmt: skip
    return [{"prompt": PROMPT.format(problem=r["problem"]), "answer": str(r["answer"])} for r in records]


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def boxed_answer_reward(completions: list, answer: list[str], **_) -> list[float]:
    """1.0 when the last `\\boxed{}` of a completion is equivalent to the answer (math-verify)."""
    from math_verify import parse, verify

    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        boxed = last_boxed(text)
        if boxed is None:
            rewards.append(0.0)
            continue
        try:
            rewards.append(float(verify(parse(f"${gold}$"), parse(f"${boxed}$"))))
        except Exception:  # noqa: BLE001 - an unparsable completion earns nothing, it does not stop training
            rewards.append(0.0)
    return rewards


def prepare_model(model, args):
    """Apply the method and return the model to train (a PEFT model for LoRA and QLoRA)."""
    if args.method in ("fura", "qfura") and args.peft_form:
        return fura_peft_model(model, args.target_modules, args.method == "qfura", args.progress, task_type="CAUSAL_LM")
    if args.method in ("fura", "qfura"):
        quantize = "nf4" if args.method == "qfura" else None
        report = convert_to_fura(model, args.target_modules, fura_config(args), quantize=quantize,
                                 progress=args.progress)  # fmt: skip
        print(report)
        return model
    if args.method == "svd":
        apply_svd(model, args)
        return model
    if args.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if args.method == "qlora":
            quantize_linears_bnb(model, args.target_modules)
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=args.target_modules, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, config)
        model.print_trainable_parameters()
        return model
    model.requires_grad_(True)
    return model


def grpo_config(args):
    """TRL's GRPOConfig with the reference's settings (see the module docstring)."""
    from trl import GRPOConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    completions = args.prompts_per_step * args.num_generations  # one policy update per generation batch
    if completions % (args.micro_batch * world):
        raise SystemExit(
            f"grpo: {args.prompts_per_step} prompts x {args.num_generations} rollouts = {completions} completions do "
            f"not split into micro-batches of {args.micro_batch} on {world} process(es)"
        )
    return GRPOConfig(
        output_dir=str(Path(args.output_dir) / "trainer"),
        max_steps=args.max_steps,
        learning_rate=args.lr if args.lr is not None else DEFAULT_LR[args.method],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=completions // (args.micro_batch * world),
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        beta=0.0,  # no KL term
        num_iterations=1,  # one update per batch: the ratio is 1, nothing is clipped
        scale_rewards="none",  # advantage = reward - group mean, no std
        loss_type="grpo" if args.loss == "reference" else "dapo",
        use_vllm=args.use_vllm,
        vllm_mode="colocate",
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=not args.progress,
        seed=args.seed,
        use_cpu=args.cpu,
        **({"optim": "paged_adamw_8bit"} if args.optim == "paged_adamw_8bit" else {}),
        **trainer_compile_settings(args),
    )


def use_merged_weight_sync(trainer) -> None:
    """Make TRL's vLLM weight sync push `merged_named_weights`: without it, TRL's non-PEFT path
    would push the `btt_*` parameters, which vLLM's model does not have."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    generation._iter_named_params = lambda: merged_named_weights(model)


def train(args) -> dict:
    """Run the recipe; returns the metrics it also writes to `output_dir/metrics.json`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    torch.manual_seed(args.seed)
    check_paths("grpo", args.model, args.output_dir)
    problems = load_problems(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation pads prompts on the left
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = prepare_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), args)
    dataset = Dataset.from_list(problems)
    callbacks = [normalize_callback()] if args.normalize_cores else None
    trainer = GRPOTrainer(model=model, reward_funcs=boxed_answer_reward, args=grpo_config(args),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)  # fmt: skip
    if args.method in ("fura", "qfura") and not args.peft_form:  # a PEFT model: TRL merges, pushes, unmerges
        use_merged_weight_sync(trainer)
    start = time.perf_counter()
    trainer.train()
    rewards = [{"step": e["step"], "reward": e["reward"]} for e in trainer.state.log_history if "reward" in e]
    metrics = {
        "method": args.method,
        "peft_form": args.peft_form,
        "loss": args.loss,
        "reward": rewards,
        "train_seconds": time.perf_counter() - start,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "setup": setup_record(args),
        "outputs": (
            save_outputs(
                trainer.accelerator.unwrap_model(trainer.model), tokenizer, args.method, args.output_dir, args.merge
            )
            if trainer.accelerator.is_main_process
            else {}
        ),
    }
    if trainer.accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_metrics(Path(args.output_dir) / "metrics.json", metrics)
    for entry in rewards:
        print(f"step {entry['step']}: mean reward {entry['reward']:.3f}")
    if rewards and all(entry["reward"] == 0 for entry in rewards):
        print(no_reward_note(args.model))
    return metrics


def no_reward_note(model: str) -> str:
    """Why a run whose completions all earned 0 learned nothing (a random tiny model, say)."""
    return (
        f"grpo: every completion earned reward 0, so every group advantage was 0 and GRPO updated nothing: "
        f"{model} never wrote a correct \\boxed{{answer}}. The run checks the pipeline (generation, rewards, "
        "weight sync, saving); to see learning, start from a model that solves some of the problems"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fura_kernels.recipes.grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local path of a causal LM (config, weights, tokenizer)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data", default=str(shipped_math_path()), help="JSON/JSONL with problem and answer")
    p.add_argument("--method", choices=METHODS, default="fura")
    p.add_argument("--peft-form", action="store_true", help=PEFT_FORM_HELP)
    p.add_argument("--target-modules", nargs="+", default=DEFAULT_TARGETS)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--num-generations", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--micro-batch", type=int, default=16, help="completions per forward/backward")
    p.add_argument("--max-completion-length", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="default: 9e-5, or 1e-5 for --method full")
    p.add_argument(
        "--loss",
        choices=["trl", "reference"],
        default="trl",
        help="loss aggregation: TRL's default (dapo) or the reference's per-sequence mean (grpo)",
    )
    p.add_argument("--use-vllm", action="store_true", help="generate rollouts in vLLM (GPU, vLLM installed)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast; trainable tensors stay fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the base weights load in")  # fmt: skip
    p.add_argument("--merge", action="store_true", help="also save the merged model")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_compile_arguments(p)
    add_knob_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_installed(("trl", "math_verify", "datasets", "peft"), "rl", "python -m fura_kernels.recipes.grpo")
    check_method_flags("grpo", args)
    check_compile_arguments("grpo", args)
    resolve_knobs("grpo", args)
    if args.method == "svd" and args.use_vllm:
        raise SystemExit("grpo: --method svd with --use-vllm: TRL would push the SVD factors, which vLLM does not "
                         "know; run the SVD baseline without vLLM")  # fmt: skip
    return run_main("grpo", train, args)


if __name__ == "__main__":
    main()
