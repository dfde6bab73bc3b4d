"""Supervised fine-tuning of a causal LM with FuRA, QFuRA, LoRA, QLoRA, full fine-tuning or the SVD baseline.

    python -m fura_kernels.recipes.sft --model PATH --output-dir OUT [--method fura] [--merge]
    accelerate launch -m fura_kernels.recipes.sft --model PATH --output-dir OUT --bf16

Data: a JSON list in the LLM-Adapters format (`instruction`, `input`, `output`), formatted with
that project's prompt template; prompt tokens are masked out of the loss. The default data is a
small set shipped with the package, for smoke runs. Optimiser: AdamW with the FuRA reference's
defaults (lr 2e-4, betas (0.9, 0.95), no weight decay), 3% linear warm-up then linear decay.
Trainable tensors stay in fp32; `--bf16` computes under bf16 autocast. LoRA and QLoRA go through
PEFT (and bitsandbytes NF4), r=32, alpha=64 and dropout 0.05 on the same modules as FuRA. The
reference's own set-ups (bf16 trainables, PagedAdamW8bit, per-group decomposition, core
normalisation, its LoRA r=64 / QLoRA r=48 baselines, the SVD baseline) are options
(`fura_kernels.recipes.knobs`; `--reference-setup` takes them all).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model import convert_to_fura
from ..optional import check_installed
from ..training import normalize_cores_after_step
from .baselines import quantize_linears_bnb
from .common import (
    PEFT_FORM_HELP,
    RecipeInputError,
    add_compile_arguments,
    check_compile_arguments,
    check_method_flags,
    check_paths,
    check_string_fields,
    enable_activation_checkpointing,
    fura_peft_model,
    read_json,
    run_main,
    save_outputs,
    write_metrics,
)
from .knobs import add_knob_arguments, apply_svd, build_optimizer, fura_config, resolve_knobs, setup_record
from .tiny_model import shipped_data_path

METHODS = ("fura", "qfura", "lora", "qlora", "full", "svd")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100

# LLM-Adapters' prompt template (the Alpaca one) for its commonsense training.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(example: dict) -> str:
    template = PROMPT_WITH_INPUT if example.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def load_examples(path: str | Path) -> list[dict]:
    examples = read_json(path, "sft")
    if not isinstance(examples, list) or not examples:
        raise RecipeInputError(f"sft: {path} must hold a non-empty JSON list of examples")
    for i, ex in enumerate(examples):
        check_string_fields(ex, i, path, "sft", ("instruction", "output"), ("input",))
    return examples


def split_examples(encoded: list[dict], eval_fraction: float, path) -> tuple[list[dict], list[dict]]:
    """(eval, train): at least one example each, and no training example without a token to learn."""
    if not 0 < eval_fraction < 1:
        raise RecipeInputError(f"sft: --eval-fraction {eval_fraction} must be between 0 and 1 (exclusive)")
    n_eval = max(1, int(len(encoded) * eval_fraction))
    if len(encoded) - n_eval < 1:
        raise RecipeInputError(
            f"sft: {path} has {len(encoded)} example(s); with --eval-fraction {eval_fraction}, "
            f"{n_eval} go to evaluation (at least one does) and none remain for training"
        )
    eval_set, train_set = encoded[:n_eval], encoded[n_eval:]
    empty = sum(all(label == IGNORE_INDEX for label in ex["labels"]) for ex in train_set)
    if empty == len(train_set):
        raise RecipeInputError(f"sft: none of the {len(train_set)} training examples of {path} has a response token "
                               "within --max-length (the prompt fills it): raise --max-length")  # fmt: skip
    if empty:
        # They would add no loss, and a batch of only them a NaN one.
        print(f"sft: dropping {empty} of {len(train_set)} training examples whose prompt fills --max-length")
        train_set = [ex for ex in train_set if any(label != IGNORE_INDEX for label in ex["labels"])]
    return eval_set, train_set


def tokenize(tokenizer, example: dict, max_length: int) -> dict:
    """input_ids of prompt + response + EOS; labels are -100 on the prompt (no loss there)."""
    prompt_ids = tokenizer(format_prompt(example), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(batch: list[dict], pad_id: int) -> dict:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def prepare_model(model, args) -> torch.nn.Module:
    """Apply the fine-tuning method; returns the model to train."""
    if args.method in ("fura", "qfura") and args.peft_form:
        return fura_peft_model(model, args.target_modules, args.method == "qfura", args.progress, task_type="CAUSAL_LM")
    if args.method in ("fura", "qfura"):
        report = convert_to_fura(
            model,
            args.target_modules,
            fura_config(args),
            quantize="nf4" if args.method == "qfura" else None,
            progress=args.progress,
        )
        print(report)
        return model
    if args.method == "svd":
        apply_svd(model, args)
        return model
    if args.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if args.method == "qlora":
            quantize_linears_bnb(model, args.target_modules)
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        model.print_trainable_parameters()
        return model
    model.requires_grad_(True)
    return model


def _evaluate(model, loader, accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            loss = model(**batch).loss
            total += accelerator.gather(loss.detach().float().reshape(1)).mean().item()
            count += 1
    model.train()
    return total / max(count, 1)


def _save(model, tokenizer, args, accelerator) -> dict:
    if not accelerator.is_main_process:
        return {}
    return save_outputs(accelerator.unwrap_model(model), tokenizer, args.method, args.output_dir, args.merge)


def train(args) -> dict:
    """Run the recipe; returns the metrics it also writes to `output_dir/metrics.json`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps its settings in a process-wide singleton; a second run in the same
        # process (a notebook, the tests) with other settings (bf16, say) must start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    compile_plugin = None
    if args.compile:  # accelerate compiles the model in prepare(), as Trainer's torch_compile does
        from accelerate.utils import TorchDynamoPlugin

        mode = None if args.compile_mode in (None, "default") else args.compile_mode
        compile_plugin = TorchDynamoPlugin(backend=args.compile_backend or "inductor", mode=mode)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision="bf16" if args.bf16 else "no",
        cpu=args.cpu,
        dynamo_plugin=compile_plugin,
    )
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    check_paths("sft", args.model, args.output_dir)
    examples = load_examples(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    random.Random(args.seed).shuffle(examples)
    encoded = [tokenize(tokenizer, ex, args.max_length) for ex in examples]
    eval_set, train_set = split_examples(encoded, args.eval_fraction, args.data)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model = prepare_model(model, args)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()

    def loader(data, shuffle):
        return torch.utils.data.DataLoader(
            data, batch_size=args.batch_size, shuffle=shuffle, collate_fn=lambda b: collate(b, tokenizer.pad_token_id)
        )

    train_loader, eval_loader = loader(train_set, True), loader(eval_set, False)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, args.lr, args)
    if args.normalize_cores:  # on the bare optimiser: accelerate's wrapper steps it only on real updates
        normalize_cores_after_step(optimizer, model)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    metrics = {
        "method": args.method,
        "train_loss": [],
        "eval_loss": [],
        "trainable_params": sum(p.numel() for p in params),
        "setup": setup_record(args),
    }
    metrics["eval_loss"].append({"step": 0, "loss": _evaluate(model, eval_loader, accelerator)})
    model.train()
    step, start = 0, time.perf_counter()
    bar = tqdm(
        total=total_steps, desc=f"sft [{args.method}]", disable=not (args.progress and accelerator.is_main_process)
    )
    while step < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            metrics["train_loss"].append({"step": step, "loss": loss.item()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.log_every == 0:
                accelerator.print(
                    f"step {step}/{total_steps} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e}"
                )
            if step % args.eval_steps == 0 or step == total_steps:
                eval_loss = _evaluate(model, eval_loader, accelerator)
                metrics["eval_loss"].append({"step": step, "loss": eval_loss})
                accelerator.print(f"step {step} eval loss {eval_loss:.4f}")
            if step >= total_steps:
                break
    bar.close()
    metrics["train_seconds"] = time.perf_counter() - start
    accelerator.wait_for_everyone()
    metrics["outputs"] = _save(model, tokenizer, args, accelerator)
    if args.eval_commonsense and accelerator.is_main_process:
        # As the reference does after training: the eight commonsense tasks (any subset present).
        from .eval_commonsense import evaluate, load_tasks, table

        results = evaluate(accelerator.unwrap_model(model), tokenizer, load_tasks(args.eval_commonsense),
                           num_beams=args.eval_num_beams, max_new_tokens=args.eval_max_new_tokens,
                           progress=args.progress)  # fmt: skip
        print(table(results))
        metrics["commonsense"] = results
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_metrics(Path(args.output_dir) / "metrics.json", metrics)
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fura_kernels.recipes.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local path of a causal LM (config, weights, tokenizer)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data", default=str(shipped_data_path()), help="LLM-Adapters-format JSON (default: shipped set)")
    p.add_argument("--method", choices=METHODS, default="fura")
    p.add_argument("--peft-form", action="store_true", help=PEFT_FORM_HELP)
    p.add_argument("--target-modules", nargs="+", default=DEFAULT_TARGETS)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast; trainable tensors stay fp32")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the base weights load in")  # fmt: skip
    p.add_argument("--merge", action="store_true", help="also save the merged model")
    p.add_argument(
        "--eval-commonsense",
        metavar="DIR",
        help="after training, score the eight commonsense tasks found under DIR/<task>/test.json",
    )
    p.add_argument("--eval-num-beams", type=int, default=4)
    p.add_argument("--eval-max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_compile_arguments(p)
    add_knob_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    peft_needed = args.method in ("lora", "qlora") or args.peft_form
    check_installed(("accelerate", "peft") if peft_needed else ("accelerate",), "sft",
                    "python -m fura_kernels.recipes.sft")  # fmt: skip
    check_method_flags("sft", args)
    check_compile_arguments("sft", args)
    resolve_knobs("sft", args)
    return run_main("sft", train, args)


if __name__ == "__main__":
    main()
