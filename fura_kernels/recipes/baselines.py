"""The baselines' base layers: bitsandbytes NF4 linears for QLoRA, built on any device."""

from __future__ import annotations

import torch
from torch import nn

from ..nf4 import require_bitsandbytes


def bnb_nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A `bitsandbytes.nn.Linear4bit` (NF4, double quantisation) holding `linear`'s weight, on
    `linear`'s device, as QLoRA's base layer. Quantisation happens as the weight moves there."""
    bnb = require_bitsandbytes("QLoRA baseline")
    compute_dtype = compute_dtype or linear.weight.dtype
    quantised = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        compress_statistics=True,
    )
    quantised.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    if linear.bias is not None:
        quantised.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
    return quantised.to(linear.weight.device)


def quantize_linears_bnb(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Replace the `nn.Linear` modules whose names end in a target with NF4 Linear4bit, in place."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules)
    ]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, bnb_nf4_linear(getattr(parent, attr)))
    return names
