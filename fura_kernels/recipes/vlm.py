"""LLaVA-style visual instruction tuning with FuRA on the language model (the reference's third track).

    python -m fura_kernels.recipes.vlm --model PATH --output-dir OUT [--method fura] [--merge]
    accelerate launch --config_file ds_zero2.yaml -m fura_kernels.recipes.vlm --model PATH --output-dir OUT --bf16

Fine-tunes a transformers `LlavaForConditionalGeneration` from a local path with HF Trainer, on
LLaVA conversation JSON (`image`, `conversations` of `human` / `gpt` turns, `<image>` in the first
human turn) with images under `--image-folder` (default: the JSON's folder). Without `--data`, a
synthetic shapes set is drawn (Pillow) into the output folder. Defaults are the reference's
(FURA_SPEC.md §10): FuRA on the seven projections of the language model only, head
factorisation off, biases frozen; the vision tower frozen; the multimodal projector fully
trained at lr 2e-5; everything else at lr 2e-4, cosine schedule, 3% warm-up, one epoch.
`--method fura | qfura | lora | full` (LoRA: PEFT r=32 on the same projections, the projector as
a module to save; full: the language model and the projector). It saves the FuRA adapter plus
`projector.safetensors` (or PEFT's adapter, or the model) and the processor, and with `--merge`
the merged model, which `LlavaForConditionalGeneration.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters import load_fura_adapter
from ..config import FuRAConfig
from ..model import convert_to_fura
from ..optional import check_installed
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

METHODS = ("fura", "qfura", "lora", "full")
# The seven projections of the language model, never the vision tower's or the projector's linears.
LANGUAGE_TARGETS = r"(.*\.)?language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_FILE = "projector.safetensors"
IGNORE_INDEX = -100


def _projector(model):
    return model.get_submodule("model.multi_modal_projector")


def prepare_model(model, method: str, progress: bool = True, peft_form: bool = False):
    """Apply the method and set which parts train: the language model's adapter (or weights), the
    projector; never the vision tower."""
    if method in ("fura", "qfura") and peft_form:  # the track's settings: no head factorisation, biases frozen
        return fura_peft_model(model, LANGUAGE_TARGETS, method == "qfura", progress, factorize_by_head=False,
                               train_bias=False, modules_to_save=["multi_modal_projector"])  # fmt: skip
    if method in ("fura", "qfura"):
        config = FuRAConfig(factorize_by_head=False, train_bias=False)
        print(convert_to_fura(model, LANGUAGE_TARGETS, config, quantize="nf4" if method == "qfura" else None,
                              progress=progress))  # fmt: skip
        _projector(model).requires_grad_(True)
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=32, lora_alpha=64, target_modules=LANGUAGE_TARGETS, modules_to_save=["multi_modal_projector"]
        )
        return get_peft_model(model, config)
    model.requires_grad_(False)
    model.get_submodule("model.language_model").requires_grad_(True)
    model.lm_head.requires_grad_(True)
    _projector(model).requires_grad_(True)
    return model


def load_records(path: str | Path, image_folder: str | Path | None = None) -> list[dict]:
    """LLaVA conversation records; with `image_folder`, every image must be there (checked before
    training, not when its batch comes up)."""
    records = read_json(path, "vlm")
    if not isinstance(records, list) or not records:
        raise RecipeInputError(f"vlm: {path} must hold a non-empty JSON list of records")
    for i, record in enumerate(records):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) < 2 or not isinstance(record.get("image"), str):
            raise RecipeInputError(f"vlm: record {i} of {path} needs 'image' and at least two 'conversations' turns")
        for turn in turns:
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise RecipeInputError(f"vlm: record {i} of {path}: every turn needs a string 'value'")
        if image_folder is not None and not (Path(image_folder) / record["image"]).is_file():
            raise RecipeInputError(f"vlm: record {i} of {path}: image {Path(image_folder) / record['image']} "
                                   "does not exist")  # fmt: skip
    return records


class LlavaCollator:
    """Batches LLaVA conversations: `USER: <image>\\n{question} ASSISTANT: {answer}</s>` per turn
    pair (LLaVA-1.5's template), the processor expanding the image token, loss on the answers only."""

    def __init__(self, processor, image_folder: Path):
        self.processor = processor
        self.image_folder = image_folder
        self.tokenizer = processor.tokenizer

    def _texts(self, record: dict) -> tuple[str, list[int]]:
        text, answer_spans = "", []
        turns = record["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2], strict=False):
            text += f"USER: {human['value']} ASSISTANT: "
            start = len(text)
            text += gpt["value"] + self.tokenizer.eos_token
            answer_spans.append((start, len(text)))
        return text, answer_spans

    def __call__(self, records: list[dict]) -> dict:
        from PIL import Image

        texts, spans = zip(*(self._texts(r) for r in records), strict=True)
        images = [Image.open(self.image_folder / r["image"]).convert("RGB") for r in records]
        batch = self.processor(images=images, text=list(texts), return_tensors="pt", padding=True,
                               return_offsets_mapping=True)  # fmt: skip
        offsets = batch.pop("offset_mapping")
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        for i, answer_spans in enumerate(spans):
            # The processor expands the one `<image>` (in the first human turn, before every
            # answer) into one token per image feature: the answers shift by the added characters.
            expanded = int((batch["input_ids"][i] == image_token_id).sum()) - 1
            shift = expanded * len(self.processor.image_token)
            answer_spans = [(s + shift, e + shift) for s, e in answer_spans]
            for j, (start, end) in enumerate(offsets[i].tolist()):
                # A token that overlaps an answer is the answer's (" It" carries the space before it).
                if (
                    batch["attention_mask"][i, j]
                    and end > start
                    and any(start < e and end > s for s, e in answer_spans)
                ):
                    labels[i, j] = batch["input_ids"][i, j]
        batch["labels"] = labels
        return batch


def _optimizer(model, lr: float, projector_lr: float):
    projector = {id(p) for n, p in model.named_parameters() if "multi_modal_projector" in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in projector], "lr": lr},
              {"params": [p for p in trainable if id(p) in projector], "lr": projector_lr}]  # fmt: skip
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def save_projector(model, directory: str | Path) -> Path:
    path = Path(directory) / PROJECTOR_FILE
    tensors = {k: v.detach().contiguous().cpu() for k, v in _projector(model).state_dict().items()}
    save_file(tensors, str(path))
    return path


def load_vlm_adapter(model, directory: str | Path, progress: bool = True):
    """A FuRA VLM adapter onto a LLaVA base: the language model's FuRA tensors, then the projector."""
    load_fura_adapter(model, directory, progress=progress)
    _projector(model).load_state_dict(load_file(str(Path(directory) / PROJECTOR_FILE)))
    return model


def train(args) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments

    from .tiny_llava import make_shapes_dataset

    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    check_paths("vlm", args.model, out)
    data = Path(args.data) if args.data else make_shapes_dataset(out / "shapes-data")
    image_folder = Path(args.image_folder) if args.image_folder else data.parent
    records = load_records(data, image_folder)
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "right"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = prepare_model(LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype), args.method,
                          args.progress, args.peft_form)  # fmt: skip
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=math.ceil(args.warmup_ratio *
        (args.max_steps or math.ceil(len(records) / args.batch_size) * args.epochs)), weight_decay=0.0,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, logging_steps=1, save_strategy="no",
        report_to=[], remove_unused_columns=False, disable_tqdm=not args.progress, seed=args.seed, use_cpu=args.cpu,
        deepspeed=args.deepspeed, **trainer_compile_settings(args),
    )  # fmt: skip
    collator = LlavaCollator(processor, image_folder)
    trainer = Trainer(model=model, args=targs, train_dataset=records, data_collator=collator,
                      optimizers=(_optimizer(model, args.lr, args.projector_lr), None))  # fmt: skip
    trainer.train()
    losses = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    model = trainer.accelerator.unwrap_model(trainer.model)
    outputs = {}
    if trainer.accelerator.is_main_process:
        outputs = save_outputs(model, processor, args.method, out, args.merge,
                               adapter_extra=lambda directory: save_projector(model, directory))  # fmt: skip
        metrics = {"method": args.method, "train_loss": losses, "outputs": outputs}
        write_metrics(out / "metrics.json", metrics)
    return {"method": args.method, "train_loss": losses, "outputs": outputs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fura_kernels.recipes.vlm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local path of a LlavaForConditionalGeneration and its processor")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data", help="LLaVA conversation JSON (default: a synthetic shapes set, drawn on the fly)")
    p.add_argument("--image-folder", help="where the records' images are (default: the JSON's folder)")
    p.add_argument("--method", choices=METHODS, default="fura")
    p.add_argument("--peft-form", action="store_true", help=PEFT_FORM_HELP)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--projector-lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast; trainable tensors stay fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--deepspeed", help="a DeepSpeed config (ZeRO-2, as the reference), passed to HF Trainer")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--merge", action="store_true", help="also save the merged model")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_compile_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_installed(("accelerate", "peft", "PIL"), "vlm", "python -m fura_kernels.recipes.vlm")
    check_method_flags("vlm", args)
    check_compile_arguments("vlm", args)
    return run_main("vlm", train, args)


if __name__ == "__main__":
    main()
