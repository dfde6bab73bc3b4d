"""What the recipes share: checking their inputs before any model loads, and saving a trained
model the way its method calls for."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapters import save_fura_adapter, save_merged


class RecipeInputError(ValueError):
    """A recipe's input (a path, a data file, a record) is unusable. `main` prints it as one line
    and exits with status 1, before anything is loaded or trained."""


def read_json(path: str | Path, recipe: str, *, lines: bool = False) -> Any:
    """A JSON document (or, with `lines`, JSON lines when the whole is not one document), with
    one-line errors that name the file: missing, empty, not UTF-8, not JSON."""
    path = Path(path)
    if not path.is_file():
        raise RecipeInputError(f"{recipe}: {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeInputError(f"{recipe}: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise RecipeInputError(f"{recipe}: {path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if not lines:
            raise RecipeInputError(f"{recipe}: {path} is not valid JSON ({err})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecipeInputError(f"{recipe}: {path} line {number} is not valid JSON ({err})") from None
    return records


def check_string_fields(record: Any, index: int, path: str | Path, recipe: str, required: tuple[str, ...],
                        optional: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Record `index` of `path` is an object whose `required` (and present `optional`) fields are strings."""
    if not isinstance(record, dict) or not set(required) <= set(record):
        need = " and ".join(repr(f) for f in required)
        also = f" (and optional {', '.join(repr(f) for f in optional)})" if optional else ""
        raise RecipeInputError(f"{recipe}: record {index} of {path} needs {need}{also}")
    for field in (*required, *(f for f in optional if f in record)):
        if not isinstance(record[field], str):
            raise RecipeInputError(f"{recipe}: record {index} of {path}: {field!r} is {type(record[field]).__name__} "
                                   f"{record[field]!r}, expected a string")  # fmt: skip


def check_paths(recipe: str, model: str | Path, output_dir: str | Path) -> None:
    """The model must be a local folder and the output folder writable: checked before anything
    loads, so a run cannot train for hours and then fail to save."""
    if not Path(model).is_dir():
        raise RecipeInputError(f"{recipe}: --model {model} is not a folder (the recipes read a local model: "
                               "config, weights and tokenizer)")  # fmt: skip
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeInputError(f"{recipe}: --output-dir {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise RecipeInputError(f"{recipe}: --output-dir {out} cannot be written to ({err.strerror})") from None


def run_main(recipe: str, train: Callable[[Any], dict], args: Any) -> dict:
    """`train(args)`, with a `RecipeInputError` turned into a one-line exit."""
    try:
        return train(args)
    except RecipeInputError as err:
        raise SystemExit(str(err)) from None


PEFT_FORM_HELP = (
    "FuRA as a PEFT method in the transform form (fura_kernels.peft: get_peft_model with FuRAPeftConfig; the base "
    "weights stay as they are, the adapter is PEFT's own files). With --method qfura the base is quantised to "
    "bitsandbytes NF4 first: FuRA on a QLoRA base"
)


def fura_peft_model(model, target_modules, quantize_base: bool, progress: bool = True, **config_fields: Any):
    """`get_peft_model(model, FuRAPeftConfig(...))` on the targets, after quantising them to
    bitsandbytes NF4 when `quantize_base` (QLoRA's base); prints the trainable parameters."""
    from peft import get_peft_model

    from ..peft import FuRAPeftConfig
    from .baselines import quantize_linears_bnb

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)  # a regex, or names
    if quantize_base:
        quantize_linears_bnb(model, targets)
    config = FuRAPeftConfig(target_modules=targets, progress_bar=progress, **config_fields)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def check_method_flags(recipe: str, args: Any) -> None:
    """The combinations of `--method`, `--peft-form` and `--merge` a recipe refuses before it loads
    anything: `--peft-form` outside FuRA, and `--merge` onto a 4-bit base (QLoRA's, or QFuRA's in
    the PEFT form), which PEFT cannot merge into on every device."""
    if args.peft_form and args.method not in ("fura", "qfura"):
        raise SystemExit(f"{recipe}: --peft-form applies to --method fura or qfura, not {args.method!r}")
    if args.merge and (args.method == "qlora" or (args.method == "qfura" and args.peft_form)):
        raise SystemExit(
            f"{recipe}: --merge with --method {args.method}{' --peft-form' if args.peft_form else ''} is not "
            "supported: PEFT cannot merge into a 4-bit base on every device. Save the adapter (the default) and "
            "merge it onto the bf16 base with PEFT instead."
        )


# torch.compile's modes: its default; "reduce-overhead" replays CUDA graphs (the host's launches
# taken off every step); "max-autotune" tunes Inductor's kernels as well.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """`--compile`, and its mode and backend: the model trains under torch.compile. FuRA's layers,
    QFuRA's and the PEFT form's compile with fullgraph=True (their kernels are custom ops with
    fakes), so a decoder layer is one graph."""
    p.add_argument("--compile", action="store_true",
                   help="train under torch.compile (HF Trainer's torch_compile=True; accelerate's dynamo plugin "
                   "for the SFT loop)")  # fmt: skip
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)")  # fmt: skip
    p.add_argument("--compile-backend", default=None,
                   help="with --compile: torch.compile's backend (default inductor; aot_eager checks a run on a "
                   "CPU)")  # fmt: skip


def check_compile_arguments(recipe: str, args: Any) -> None:
    """`--compile-mode` and `--compile-backend` only go with `--compile`."""
    for flag in ("compile_mode", "compile_backend"):
        if getattr(args, flag) is not None and not args.compile:
            raise SystemExit(f"{recipe}: --{flag.replace('_', '-')} {getattr(args, flag)!r} needs --compile")


def trainer_compile_settings(args: Any) -> dict:
    """HF TrainingArguments' (and TRL's configs') torch_compile fields for `--compile`."""
    if not args.compile:
        return {}
    settings = {"torch_compile": True, "torch_compile_backend": args.compile_backend or "inductor"}
    if args.compile_mode not in (None, "default"):
        settings["torch_compile_mode"] = args.compile_mode
    return settings


def is_peft_model(model) -> bool:
    """A PEFT model (LoRA, QLoRA, or FuRA in the PEFT form): PEFT saves and merges it."""
    return hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None))


def save_outputs(model, processor, method: str, output_dir: str | Path, merge: bool,
                 adapter_extra: Callable[[Path], object] | None = None) -> dict[str, str]:  # fmt: skip
    """Save `model` (unwrapped, on the main process) as its method calls for; returns the paths.

    - FuRA / QFuRA: the adapter (`save_fura_adapter`), then `adapter_extra(adapter_dir)` (say, a
      VLM's projector); with `merge`, the merged model as the base architecture saves it;
    - LoRA / QLoRA and FuRA in the PEFT form: PEFT's adapter; with `merge`, PEFT's merged model;
    - full fine-tuning: the model; the SVD baseline: the model with its factors merged back into
      plain linears (in the base's dtype), which `from_pretrained` loads.

    The processor (tokenizer) is saved beside every full model (merged or fine-tuned)."""
    out = Path(output_dir)
    paths: dict[str, str] = {}
    if method in ("fura", "qfura") and not is_peft_model(model):
        paths["adapter"] = str(save_fura_adapter(model, out / "adapter"))
        if adapter_extra is not None:
            adapter_extra(out / "adapter")
        if merge:
            paths["merged"] = str(save_merged(model, out / "merged"))
    elif method in ("lora", "qlora", "fura", "qfura"):
        model.save_pretrained(out / "adapter")
        paths["adapter"] = str(out / "adapter")
        if merge:
            model.merge_and_unload().save_pretrained(out / "merged")
            paths["merged"] = str(out / "merged")
    else:
        if method == "svd":
            from ..svd_baseline import merge_svd

            merge_svd(model)
        model.save_pretrained(out / "model")
        paths["model"] = str(out / "model")
    for key in ("merged", "model"):
        if key in paths:
            processor.save_pretrained(paths[key])
    return paths


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on a transformers model, by the name its version
    uses (5.x renamed `gradient_checkpointing_enable`, which now warns that it is deprecated)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def write_metrics(path: str | Path, metrics: dict) -> None:
    """`metrics` as strict JSON: a non-finite number (a NaN loss, say) is written as null, which
    every JSON reader accepts, where Python's default `NaN` is not JSON at all."""

    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [strict(v) for v in value]
        return value

    Path(path).write_text(json.dumps(strict(metrics), indent=1, allow_nan=False) + "\n")
