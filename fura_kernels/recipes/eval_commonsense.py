"""Score a causal LM on the eight commonsense tasks, as the FuRA reference's first track does.

    python -m fura_kernels.recipes.eval_commonsense --model PATH [--adapter DIR] [--data DIR] [--out FILE]

Tasks: boolq, piqa, social_i_qa, ARC-Challenge, ARC-Easy, openbookqa, hellaswag, winogrande, each a
`DIR/<task>/test.json` of `instruction` / `answer` records in the LLM-Adapters format (any subset
present is run). Each instruction goes through the LLM-Adapters prompt template (the SFT
recipe's), decoded with 4 beams and up to 256 new tokens, prompts left-padded in batches. The
prediction is the first match of the task's answer pattern in the lower-cased output (`true|false`,
`solution1|2`, `answer1-5`, `ending1-4`, `option1|2`), compared exactly with `answer`; no match
scores wrong. Prints per-task and mean accuracy and writes them as JSON with `--out`. A handful of
examples per task, written for this project, ship as the default data so the command runs
offline.
"""

from __future__ import annotations

import argparse
import json
import re
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import RecipeInputError, check_string_fields, read_json
from .sft import format_prompt

# The answer patterns of LLM-Adapters' commonsense evaluation, by task.
_CHOICES5 = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": _CHOICES5,
    "ARC-Challenge": _CHOICES5,
    "ARC-Easy": _CHOICES5,
    "openbookqa": _CHOICES5,
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
TASKS = tuple(ANSWER_PATTERNS)


def shipped_eval_dir() -> Path:
    return Path(str(resources.files("fura_kernels.recipes") / "data" / "commonsense_eval"))


def extract_answer(task: str, output: str) -> str:
    """The first match of the task's pattern in the lower-cased output, or "" (scored wrong)."""
    match = re.search(ANSWER_PATTERNS[task], output.lower())
    return match.group(0) if match else ""


def load_tasks(directory: str | Path) -> dict[str, list[dict]]:
    """`{task: records}` for every task whose `test.json` is under `directory`."""
    found = {}
    for task in TASKS:
        path = Path(directory) / task / "test.json"
        if path.is_file():
            records = read_json(path, "eval_commonsense")
            if not isinstance(records, list) or not records:
                raise RecipeInputError(f"eval_commonsense: {path} must hold a non-empty JSON list of records")
            for i, record in enumerate(records):
                check_string_fields(record, i, path, "eval_commonsense", ("instruction", "answer"), ("input",))
            found[task] = records
    if not found:
        raise RecipeInputError(f"eval_commonsense: no <task>/test.json under {directory} (tasks: {', '.join(TASKS)})")
    return found


@torch.no_grad()
def evaluate(model, tokenizer, tasks: dict[str, list[dict]], *, batch_size: int = 8, num_beams: int = 4,
             max_new_tokens: int = 256, progress: bool = True) -> dict:  # fmt: skip
    """Per-task accuracy (and the mean over tasks) of `model` on `tasks`."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    device = next(model.parameters()).device
    results = {}
    total = sum(len(records) for records in tasks.values())
    with tqdm(total=total, desc="commonsense eval", unit="example", disable=not progress) as bar:
        for task, records in tasks.items():
            correct = 0
            for start in range(0, len(records), batch_size):
                batch = records[start : start + batch_size]
                prompts = [format_prompt({"instruction": r["instruction"], "input": r.get("input", "")}) for r in batch]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
                generated = model.generate(**encoded, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                           do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
                outputs = tokenizer.batch_decode(
                    generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
                )
                correct += sum(extract_answer(task, out) == r["answer"] for out, r in zip(outputs, batch, strict=True))
                bar.update(len(batch))
            results[task] = {"accuracy": correct / len(records), "correct": correct, "total": len(records)}
    results["mean"] = sum(r["accuracy"] for r in results.values()) / len(tasks)
    return results


def table(results: dict) -> str:
    lines = ["| task | accuracy | correct / total |", "|---|---|---|"]
    lines += [f"| {task} | {r['accuracy']:.3f} | {r['correct']} / {r['total']} |" for task, r in results.items()
              if task != "mean"]  # fmt: skip
    lines.append(f"| mean | {results['mean']:.3f} | |")
    return "\n".join(lines)


def load_model(model_path: str | Path, adapter: str | Path | None, dtype: str = "auto"):
    """The base model with a FuRA adapter (fura_config.json) or a PEFT one (adapter_config.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters import ADAPTER_CONFIG, load_fura_adapter
    from ..layer import FusedBTTLinear

    if not Path(model_path).is_dir():
        raise RecipeInputError(f"eval_commonsense: --model {model_path} is not a folder (a local model is read)")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto")
    if adapter is not None:
        adapter = Path(adapter)
        if (adapter / ADAPTER_CONFIG).is_file():
            load_fura_adapter(model, adapter, progress=False)
            layers = sum(isinstance(m, FusedBTTLinear) for m in model.modules())
            print(f"eval_commonsense: loaded the FuRA adapter {adapter} ({layers} FuRA layers)")
        elif (adapter / "adapter_config.json").is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
            print(f"eval_commonsense: loaded the PEFT adapter {adapter}")
        else:
            raise RecipeInputError(f"eval_commonsense: {adapter} holds neither a FuRA nor a PEFT adapter")
    return model, tokenizer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fura_kernels.recipes.eval_commonsense",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--model", required=True, help="local path of a causal LM (the base, with --adapter)")
    p.add_argument("--adapter", help="a FuRA adapter (save_fura_adapter) or a PEFT adapter directory")
    p.add_argument("--data", default=str(shipped_eval_dir()), help="a folder of <task>/test.json")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        tasks = load_tasks(args.data)
        model, tokenizer = load_model(args.model, args.adapter, args.dtype)
    except RecipeInputError as err:
        raise SystemExit(str(err)) from None
    if torch.cuda.is_available():
        model = model.cuda()
    results = evaluate(model, tokenizer, tasks, batch_size=args.batch_size, num_beams=args.num_beams,
                       max_new_tokens=args.max_new_tokens, progress=args.progress)  # fmt: skip
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
