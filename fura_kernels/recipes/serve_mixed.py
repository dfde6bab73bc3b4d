"""Serve several FuRA adapters from one base, in one mixed batch.

    python -m fura_kernels.recipes.serve_mixed --model PATH --adapter NAME=DIR [--adapter NAME=DIR ...]

Loads the base once and every adapter (FuRA's PEFT form, as `sft --peft-form` saves it) by copy,
then answers one batch of prompts in which each prompt names the adapter that answers it
(`generate(..., adapter_names=[...])`; `"__base__"` is the base model), and prints which adapter
answered what. An adapter named after a commonsense task (`boolq`, `piqa`, ...) gets prompts from
that task's shipped examples; any other gets the shipped SFT examples. The prompts of all
adapters are interleaved, so every step of the batch mixes them, and one prompt goes to the base.
Then each adapter answers its own prompts alone (`set_adapter`), and the recipe checks that the
mixed batch gave the same tokens: it exits with an error if any answer differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..optional import check_installed
from .common import RecipeInputError, read_json, run_main
from .eval_commonsense import TASKS, load_tasks, shipped_eval_dir
from .sft import format_prompt
from .tiny_model import shipped_data_path

BASE_ADAPTER = "__base__"


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """`NAME=DIR` pairs, each DIR an adapter folder with PEFT's adapter_config.json."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise RecipeInputError(f"serve_mixed: --adapter {value!r} is not NAME=DIR")
        if name == BASE_ADAPTER or name in adapters:
            raise RecipeInputError(f"serve_mixed: --adapter name {name!r} is reserved or given twice")
        if not (Path(directory) / "adapter_config.json").is_file():
            raise RecipeInputError(f"serve_mixed: --adapter {name}={directory}: no adapter_config.json in that folder "
                                   "(the SFT recipe with --peft-form saves one under OUTPUT_DIR/adapter)")  # fmt: skip
        adapters[name] = Path(directory)
    return adapters


def mixed_requests(names: list[str], per_adapter: int) -> list[tuple[str, str]]:
    """`(adapter, prompt)` pairs: `per_adapter` prompts an adapter, interleaved, then one for the base."""
    tasks = load_tasks(shipped_eval_dir())
    sft_examples = read_json(shipped_data_path(), "serve_mixed")
    queues = {}
    for name in names:
        records = tasks[name] if name in TASKS and name in tasks else sft_examples
        queues[name] = [format_prompt(r) for r in records[:per_adapter]]
    requests = [(name, queues[name][i]) for i in range(per_adapter) for name in names if i < len(queues[name])]
    return [*requests, (BASE_ADAPTER, requests[0][1])]


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, **extra) -> list[str]:
    """Greedy answers to left-padded prompts (the KV cache on)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **extra)  # fmt: skip
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def serve(args: argparse.Namespace) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fura_kernels.peft  # noqa: F401  (registers FuRA with PEFT)

    adapters = parse_adapters(args.adapter)
    if not Path(args.model).is_dir():
        raise RecipeInputError(f"serve_mixed: --model {args.model} is not a folder")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)  # a copy: no SVD
    model.eval()

    requests = mixed_requests(names, args.prompts_per_adapter)
    who = [name for name, _ in requests]
    prompts = [prompt for _, prompt in requests]
    mixed = answer(model, tokenizer, prompts, args.max_new_tokens, adapter_names=who)
    print(f"one batch of {len(prompts)} prompts over adapters {names} and the base:")
    for name, prompt, text in zip(who, prompts, mixed, strict=True):
        question = prompt.split("### Instruction:")[-1].strip().splitlines()[0][:70]
        print(f"  [{name}] {question!r} -> {text.strip()!r}")

    alone = list(mixed)
    for name in [*names, BASE_ADAPTER]:
        rows = [i for i, n in enumerate(who) if n == name]
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                texts = answer(model, tokenizer, [prompts[i] for i in rows], args.max_new_tokens)
        else:
            model.set_adapter(name)
            texts = answer(model, tokenizer, [prompts[i] for i in rows], args.max_new_tokens)
        for i, text in zip(rows, texts, strict=True):
            alone[i] = text
    differing = [i for i, (a, b) in enumerate(zip(mixed, alone, strict=True)) if a != b]
    if differing:
        raise SystemExit(f"serve_mixed: the mixed batch's answers {differing} differ from their adapters run alone")
    print(f"each answer equals its adapter's answer run alone ({len(prompts)} of {len(prompts)})")
    return {"adapters": names, "requests": [{"adapter": n, "prompt": p, "answer": a}
                                            for n, p, a in zip(who, prompts, mixed, strict=True)]}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fura_kernels.recipes.serve_mixed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local path of the base causal LM the adapters were trained on")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                   help="a FuRA adapter (PEFT form) and the name requests use for it; repeatable")  # fmt: skip
    p.add_argument("--prompts-per-adapter", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_installed(("peft",), "sft", "python -m fura_kernels.recipes.serve_mixed")
    return run_main("serve_mixed", serve, args)


if __name__ == "__main__":
    main()
