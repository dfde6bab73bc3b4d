"""The methods a benchmark compares, each built around the same random base layer.

Every method gives one training step of one linear layer: forward and backward, the layer's
share of a model's step and the figure the layer suite reports first, and beside it the same with
an AdamW step (where it has trainable tensors), which a model runs once for all its layers. PEFT LoRA/QLoRA are the real
peft library on a real (bitsandbytes NF4, for QLoRA) base layer; so is FuRA's PEFT form
(`fura_peft`, `fura_kernels.peft`), on the plain base and on QLoRA's NF4 base (`fura_peft_nf4`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fura_kernels import FusedBTTLinear, QFusedBTTLinear
from fura_kernels.recipes.baselines import bnb_nf4_linear

from .baselines import ReferenceBTTLinear

METHODS = (
    "dense_floor",
    "fura",
    "fura_peft",
    "qfura",
    "fura_peft_nf4",
    "lora_r32",
    "lora_r64",
    "qlora_r32",
    "reference",
    "full_ft",
)
# How a method is run (FURA_SPEC.md §8). "fair": what HF Trainer does with bf16=True, for every
# method alike: bf16 base weights, fp32 trainable weights (full fine-tuning keeps fp32 master
# weights), bf16 autocast, AdamW(fused=True). "pure": the storage the libraries default to, no
# autocast, AdamW's default implementation; PEFT's fp32 adapters then run fp32 GEMMs there.
CONFIGURATIONS = ("fair", "pure")


@dataclass(frozen=True)
class LayerCase:
    """A projection shape: `in -> out`, cut into `n` input blocks of `b` (head-aligned for o)."""

    name: str
    in_features: int
    out_features: int
    n: int
    b: int


class _Holder(nn.Module):
    """PEFT targets modules by name: the benchmarked linear sits at `.proj`."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def base_linear(case: LayerCase, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Linear:
    """The shared random base layer (std 1/sqrt(in), never zeros)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(case.out_features, case.in_features, generator=generator) / case.in_features**0.5
    linear = nn.Linear(case.in_features, case.out_features, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def _lora(base: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"], bias="none")
    return get_peft_model(_Holder(base), config)


def _fura_peft(base: nn.Module, case: LayerCase) -> nn.Module:
    from peft import get_peft_model

    from fura_kernels.peft import FuRAPeftConfig

    config = FuRAPeftConfig(target_modules=["proj"], input_factorization=[case.n, case.b], progress_bar=False)
    return get_peft_model(_Holder(base), config)


def build(
    method: str, case: LayerCase, dtype: torch.dtype, device: torch.device, configuration: str = "fair"
) -> nn.Module:
    """The module for `method` on `case`; its trainable tensors are exactly its `requires_grad` ones."""
    linear = base_linear(case, dtype, device)
    factor = {"input_factorization": (case.n, case.b)}
    if method == "dense_floor":
        linear.requires_grad_(False)
        return linear
    if method == "full_ft":  # mixed precision keeps fp32 master weights under autocast
        return linear.float() if configuration == "fair" else linear
    if method == "fura":
        return FusedBTTLinear.from_linear(linear, **factor)
    if method == "qfura":
        return QFusedBTTLinear.from_linear(linear, **factor)
    if method == "reference":
        return ReferenceBTTLinear(FusedBTTLinear.from_linear(linear, **factor))
    if method in ("lora_r32", "lora_r64"):
        linear.requires_grad_(False)
        return _lora(linear, int(method.rsplit("r", 1)[1]))
    if method == "qlora_r32":
        return _lora(bnb_nf4_linear(linear, dtype), 32)
    if method == "fura_peft":
        linear.requires_grad_(False)
        return _fura_peft(linear, case)
    if method == "fura_peft_nf4":
        return _fura_peft(bnb_nf4_linear(linear, dtype), case)
    raise ValueError(f"bench.methods.build: unknown method {method!r}; expected one of {METHODS}")


# The projections a whole-model run adapts: all seven of a Llama decoder layer.
MODEL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Methods that adapt a whole model (`adapt_model`); full fine-tuning trains it as it is.
ADAPTED_METHODS = ("fura", "qfura", "lora_r32", "qlora_r32", "fura_peft", "fura_peft_nf4")


def adapt_model(model: nn.Module, method: str, targets=MODEL_TARGETS) -> nn.Module:
    """`model` with `method` on its `targets` projections, as the method's users apply it:
    `convert_to_fura` (QFuRA: its NF4 core), PEFT's `get_peft_model` with LoRA r=32 (QLoRA: on
    bitsandbytes NF4 linears) or with FuRA's PEFT config (on the plain or the NF4 base)."""
    from peft import LoraConfig, get_peft_model

    from fura_kernels import convert_to_fura
    from fura_kernels.recipes.baselines import quantize_linears_bnb

    targets = list(targets)
    if method in ("fura", "qfura"):
        convert_to_fura(model, targets, quantize="nf4" if method == "qfura" else None, progress=False)
        return model
    if method in ("qlora_r32", "fura_peft_nf4"):
        quantize_linears_bnb(model, targets)
    if method in ("lora_r32", "qlora_r32"):
        return get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=targets))
    if method in ("fura_peft", "fura_peft_nf4"):
        from fura_kernels.peft import FuRAPeftConfig

        return get_peft_model(model, FuRAPeftConfig(target_modules=targets, progress_bar=False))
    raise ValueError(f"bench.methods.adapt_model: unknown method {method!r}; expected one of {ADAPTED_METHODS}")


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def autocast_dtype(configuration: str, dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of a configuration: the compute dtype when it is half precision."""
    return dtype if configuration == "fair" and dtype in (torch.bfloat16, torch.float16) else None


def make_optimizer(params, configuration: str, capturable: bool = False):
    if not params:
        return None
    if configuration == "fair":
        return torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=capturable)
    return torch.optim.AdamW(params, lr=1e-4, capturable=capturable)


def make_step(
    module: nn.Module,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    configuration: str = "fair",
    capturable: bool = False,
    optimizer_step: bool = True,
) -> Callable[[int], None]:
    """One training step on input set `i % len(inputs)` in `configuration`: forward (under
    autocast in "fair"), backward (dx always: the layer sits inside a network), then, with
    `optimizer_step`, AdamW on the trainable tensors (fused in "fair"; `capturable` for
    CUDA-graph capture) and `zero_grad`. Without it the gradients are dropped before the next
    backward (no accumulation kernel a real step would not run)."""
    params = trainable(module)
    optimizer = make_optimizer(params, configuration, capturable) if optimizer_step else None
    x0 = inputs[0][0]
    amp = autocast_dtype(configuration, x0.dtype)

    def step(i: int) -> None:
        x, dy = inputs[i % len(inputs)]
        x.grad = None
        if optimizer is None:
            for p in params:
                p.grad = None
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            y = module(x)
        y.backward(dy.to(y.dtype))
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step
