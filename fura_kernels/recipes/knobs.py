"""The FuRA reference's training set-ups, as options the SFT and GRPO recipes share.

- `--decomp-mode`: one mode, or one per module group (`{qkv:input,o:output,...}`, its RL ablations);
- `--normalize-cores`: unit-norm trained cores after every optimiser step
  (`--blocktt_normalize_after_update`);
- `--trainable-dtype bfloat16`: FuRA's (and the SVD baseline's) trained tensors in bf16, the
  reference's default (ours is fp32: bf16 trainables lose small AdamW updates, FURA_SPEC.md §6);
- `--optim paged_adamw_8bit`: bitsandbytes' PagedAdamW8bit, the reference's QFuRA/QLoRA optimiser;
- `--method svd` with `--svd-train-position` / `--svd-random-basis`: the SVD baseline and its
  random-basis ablation (`fura_kernels.svd_baseline`);
- `--lora-r/--lora-alpha/--lora-dropout`, and `--reference-setup`, which fills every one of these
  left unset with what the reference ran: bf16 trainables, PagedAdamW8bit for QFuRA and QLoRA (SFT),
  and its LoRA baselines (`REFERENCE_LORA`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..config import FuRAConfig
from ..optional import check_installed
from ..svd_baseline import TRAIN_POSITIONS as SVD_TRAIN_POSITIONS
from ..svd_baseline import convert_to_svd

# (r, alpha, dropout) of the LoRA baselines as the reference's scripts ran them: commonsense LoRA
# (finetune_commonsense_lora.sh), QLoRA (finetune_commonsense_qlora.sh), RL LoRA (run_rl.py).
REFERENCE_LORA = {
    ("sft", "lora"): (64, 128, 0.05),
    ("sft", "qlora"): (48, 96, 0.05),
    ("grpo", "lora"): (32, 32, 0.0),
    ("grpo", "qlora"): (32, 32, 0.0),
}
# This project's LoRA defaults (unchanged when --reference-setup is off).
OUR_LORA = {"sft": (32, 64, 0.05), "grpo": (32, 64, 0.0)}
FURA_METHODS = ("fura", "qfura")
BF16_TRAINABLE_METHODS = ("fura", "qfura", "svd")


def add_knob_arguments(p: argparse.ArgumentParser) -> None:
    """The shared options (see the module docstring); `resolve_knobs` checks and fills them."""
    p.add_argument("--decomp-mode", default=None,
                   help="FuRA's block grid: output_one_block (default), input_one_block, square, or one mode per "
                   "module group as a dict, e.g. '{qkv:input,o:output,mlp_upgate:output,mlp_down:output}'")  # fmt: skip
    p.add_argument("--normalize-cores", action="store_true",
                   help="rescale FuRA's trained cores to unit-norm block vectors after every optimizer step "
                   "(the reference's --blocktt_normalize_after_update)")  # fmt: skip
    p.add_argument("--trainable-dtype", choices=["float32", "bfloat16"], default=None,
                   help="storage of FuRA's / the SVD baseline's trained tensors (default float32; the reference "
                   "used bfloat16)")  # fmt: skip
    p.add_argument(
        "--optim",
        choices=["adamw", "paged_adamw_8bit"],
        default=None,
        help="AdamW (default) or bitsandbytes' PagedAdamW8bit (the reference's for QFuRA and QLoRA)",
    )
    p.add_argument(
        "--svd-train-position",
        choices=SVD_TRAIN_POSITIONS,
        default=None,
        help="--method svd: train the output factor U (default), the input factor Vh, or both",
    )
    p.add_argument(
        "--svd-random-basis",
        action="store_true",
        help="--method svd: the random-basis ablation (the reference's FURA_SVD_RANDOM_U=1)",
    )
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lora-alpha", type=int, default=None)
    p.add_argument("--lora-dropout", type=float, default=None)
    p.add_argument("--reference-setup", action="store_true",
                   help="every option above left unset takes the reference's value: bf16 trainables, "
                   "PagedAdamW8bit for qfura/qlora (sft), its LoRA r/alpha/dropout")  # fmt: skip


def resolve_knobs(recipe: str, args: Any) -> None:
    """Refuse options that do not apply to `args.method` (naming both), then fill the unset ones
    from this project's defaults or, with `--reference-setup`, the reference's."""
    method, peft_form = args.method, getattr(args, "peft_form", False)

    def refuse(option: str, applies_to: str) -> None:
        raise SystemExit(f"{recipe}: {option} applies to {applies_to}, not --method {method}")

    if args.normalize_cores and method not in FURA_METHODS:
        refuse("--normalize-cores", "--method fura or qfura")
    if args.decomp_mode is not None and method not in FURA_METHODS:
        refuse("--decomp-mode", "--method fura or qfura")
    if args.decomp_mode is not None and peft_form:
        raise SystemExit(f"{recipe}: --decomp-mode with --peft-form: the transform form is output_one_block only")
    if (args.svd_train_position or args.svd_random_basis) and method != "svd":
        refuse("--svd-train-position / --svd-random-basis", "--method svd")
    if args.trainable_dtype == "bfloat16" and (method not in BF16_TRAINABLE_METHODS or peft_form):
        refuse("--trainable-dtype bfloat16", "--method fura, qfura (not --peft-form) or svd; LoRA's adapter dtype is "
               "PEFT's and full fine-tuning trains the model's --dtype")  # fmt: skip
    if args.decomp_mode is not None:
        try:
            FuRAConfig(decomp_mode=args.decomp_mode)
        except ValueError as err:
            raise SystemExit(f"{recipe}: --decomp-mode {args.decomp_mode!r}: {err}") from None
    reference = args.reference_setup
    if args.trainable_dtype is None:
        bf16 = reference and method in BF16_TRAINABLE_METHODS and not peft_form
        args.trainable_dtype = "bfloat16" if bf16 else "float32"
    if args.optim is None:
        args.optim = "paged_adamw_8bit" if reference and recipe == "sft" and method in ("qfura", "qlora") else "adamw"
    if args.optim == "paged_adamw_8bit":
        check_installed(("bitsandbytes",), "quant", f"python -m fura_kernels.recipes.{recipe} --optim paged_adamw_8bit")
    if method == "svd" and args.svd_train_position is None:
        args.svd_train_position = "output"
    lora = REFERENCE_LORA.get((recipe, method)) if reference else None
    defaults = lora or OUR_LORA[recipe]
    for name, value in zip(("lora_r", "lora_alpha", "lora_dropout"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)


SETUP_FIELDS = ("decomp_mode", "normalize_cores", "trainable_dtype", "optim", "svd_train_position",
                "svd_random_basis", "lora_r", "lora_alpha", "lora_dropout", "reference_setup")  # fmt: skip


def setup_record(args: Any) -> dict[str, Any]:
    """The resolved options, as a run's metrics.json records them."""
    return {name: getattr(args, name) for name in SETUP_FIELDS}


def fura_config(args: Any) -> FuRAConfig:
    """The FuRAConfig the options ask for (the paper's defaults otherwise)."""
    fields: dict[str, Any] = {"trainable_dtype": getattr(torch, args.trainable_dtype)}
    if args.decomp_mode is not None:
        fields["decomp_mode"] = args.decomp_mode
    return FuRAConfig(**fields)


def apply_svd(model: torch.nn.Module, args: Any) -> dict:
    """`--method svd`: the SVD baseline (or its random-basis ablation) on the target modules."""
    report = convert_to_svd(model, args.target_modules, train_position=args.svd_train_position,
                            random_basis=args.svd_random_basis, seed=args.seed,
                            trainable_dtype=getattr(torch, args.trainable_dtype))  # fmt: skip
    kind = "random-basis SVD" if args.svd_random_basis else "SVD"
    print(f"{kind} baseline: {report['num_svd_layers']} layers, train_position={args.svd_train_position}, "
          f"{report['trainable_param_count']:,} trainable parameters")  # fmt: skip
    return report


def build_optimizer(params: list[torch.nn.Parameter], lr: float, args: Any) -> torch.optim.Optimizer:
    """AdamW or PagedAdamW8bit with the reference's betas (0.9, 0.95) and no weight decay."""
    if args.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
