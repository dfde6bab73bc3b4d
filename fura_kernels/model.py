"""Whole-model API: convert the linears of any PyTorch / Hugging Face model to FuRA, and back."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FuRAConfig
from .factorization import resolve_block_shape
from .layer import FusedBTTLinear
from .qlayer import QUANT_TYPES, QFusedBTTLinear

TargetModules = str | Iterable[str]
ALL_LINEAR = "all-linear"


@dataclass
class ConversionReport:
    """What `convert_to_fura` did."""

    converted: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    quantize: str | None = None
    nf4_bytes: int = 0  # bytes of the NF4 frozen cores (not counted as parameters)
    max_nf4_relative_error: float = 0.0  # worst per-layer quantisation error of a frozen core

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        text = (
            f"FuRA: converted {len(self.converted)} linear layers; trainable parameters "
            f"{self.trainable_params:,} of {self.total_params:,} ({100 * self.trainable_fraction:.3f}%)"
        )
        if self.quantize:
            text += (
                f"; frozen cores in {self.quantize}: {self.nf4_bytes:,} bytes, worst relative "
                f"quantisation error {self.max_nf4_relative_error:.2e}"
            )
        return text


def _name_matches(name: str, patterns: TargetModules) -> bool:
    """PEFT-style matching: a regex string must match the whole name; a list matches a name
    equal to an entry or ending in '.' + entry."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_patterns(patterns: Any, arg: str) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str):
        if patterns == ALL_LINEAR and arg == "target_modules":
            return
        try:
            re.compile(patterns)
        except re.error as err:
            raise ValueError(f"convert_to_fura: {arg}={patterns!r} is not a valid regex: {err}") from None
        return
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"convert_to_fura: {arg} must be a list of module-name suffixes, a regex string"
            f"{' or ' + repr(ALL_LINEAR) if arg == 'target_modules' else ''}; got {patterns!r}"
        )


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection (`lm_head` and the like), which `all-linear` skips as PEFT does."""
    names = {name for name, _ in model.named_modules() if name == "lm_head" or name.endswith(".lm_head")}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            output = get_output()
        except (AttributeError, NotImplementedError):
            output = None
        if output is not None:
            names.update(name for name, module in model.named_modules() if module is output)
    return names


def find_target_linears(
    model: nn.Module, target_modules: TargetModules, exclude_modules: TargetModules | None = None
) -> list[str]:
    """Names of the `nn.Linear` modules that `target_modules` selects and `exclude_modules` does not."""
    _check_patterns(target_modules, "target_modules")
    _check_patterns(exclude_modules, "exclude_modules")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        exclude_modules = list(exclude_modules)
    skip = _output_layer_names(model) if target_modules == ALL_LINEAR else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in skip:
            continue
        if target_modules != ALL_LINEAR and not _name_matches(name, target_modules):
            continue
        if exclude_modules is not None and _name_matches(name, exclude_modules):
            continue
        names.append(name)
    return names


def _split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def convert_to_fura(
    model: nn.Module,
    target_modules: TargetModules,
    config: FuRAConfig | None = None,
    exclude_modules: TargetModules | None = None,
    *,
    quantize: str | None = None,
    double_quant: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Replace the selected `nn.Linear` layers of `model` with `FusedBTTLinear`, in place.

    `target_modules`: a list of name suffixes (`["q_proj", "v_proj"]`), a regex that must match
    the whole module name, or `"all-linear"` (every linear but the output layer). Every other
    parameter of the model is frozen. Attention projections are cut at head boundaries when
    `config.factorize_by_head` is on and the model has a transformers `config`.

    A model on the `meta` device converts to correctly shaped layers without values, for
    parameter counts and memory plans.

    `quantize="nf4"` stores each frozen L core in NF4 (`QFusedBTTLinear`, QFuRA; `double_quant`
    on by default). `device` streams the conversion: each layer's weight is copied to `device`,
    decomposed (and quantised) there, and the new layer stays there, one layer at a time, so a
    model held on the CPU whose bf16 weights would not fit on the GPU converts with about one
    layer's worth of temporaries on the GPU.

    All layers are validated before any is decomposed. If anything fails, the model is put back
    exactly as it was (modules and `requires_grad` flags) and the error is raised. While it
    runs, the original layers stay alive until the end so that the rollback is possible.
    """
    config = config if config is not None else FuRAConfig()
    if not isinstance(config, FuRAConfig):
        raise TypeError(f"convert_to_fura: config must be a FuRAConfig, got {type(config).__name__}")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(
            f"convert_to_fura: quantize={quantize!r} is not supported; expected None or one of {QUANT_TYPES}"
        )
    names = find_target_linears(model, target_modules, exclude_modules)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        sample = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
        raise ValueError(
            f"convert_to_fura: target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) "
            f"matched no nn.Linear in {type(model).__name__}; its linears are: {sample or 'none'}"
        )
    model_config = getattr(model, "config", None)
    for name in names:  # fail fast, before any SVD: shapes, head counts and ranks for every layer
        linear = model.get_submodule(name)
        resolve_block_shape(linear.in_features, linear.out_features, config, name, model_config)

    requires_grad_before = {id(p): p.requires_grad for p in model.parameters()}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in tqdm(names, desc="FuRA: converting", unit="layer", disable=not progress):
            parent, attr = _split_name(model, name)
            original = getattr(parent, attr)
            source = _on_device(original, device)
            if quantize is None:
                layer = FusedBTTLinear.from_linear(source, config, module_name=name, model_config=model_config)
            else:
                layer = QFusedBTTLinear.from_linear(
                    source, config, double_quant=double_quant, module_name=name, model_config=model_config
                )
            del source
            setattr(parent, attr, layer)
            replaced.append((parent, attr, original))
        fura_trainable = {
            id(p)
            for module in model.modules()
            if isinstance(module, FusedBTTLinear)
            for p in module.parameters()
            if p.requires_grad
        }
        for p in model.parameters():
            if id(p) not in fura_trainable:
                p.requires_grad_(False)
    except BaseException:
        for parent, attr, original in reversed(replaced):
            setattr(parent, attr, original)
        for p in model.parameters():
            if id(p) in requires_grad_before:
                p.requires_grad_(requires_grad_before[id(p)])
        raise
    trainable, total = count_parameters(model)
    report = ConversionReport(converted=names, trainable_params=trainable, total_params=total, quantize=quantize)
    qlayers = [m for m in model.modules() if isinstance(m, QFusedBTTLinear)]
    if quantize is not None and qlayers:
        report.nf4_bytes = sum(q.nf4_bytes() for q in qlayers)
        errors = [q.nf4_relative_error for q in qlayers if q.nf4_relative_error == q.nf4_relative_error]
        report.max_nf4_relative_error = max(errors, default=0.0)
    return report


def _on_device(linear: nn.Linear, device: torch.device | str | None) -> nn.Linear:
    """`linear` itself, or a temporary copy of it on `device` (the original is untouched)."""
    if device is None or linear.weight.device == torch.device(device):
        return linear
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    copy.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
    if linear.bias is not None:
        copy.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return copy


def merge_fura(model: nn.Module) -> nn.Module:
    """Replace every `FusedBTTLinear` in `model` with its merged `nn.Linear`, in place.

    Returns the model (or the merged linear, when `model` is itself a `FusedBTTLinear`).
    """
    if isinstance(model, FusedBTTLinear):
        return model.to_linear()
    names = [name for name, module in model.named_modules() if isinstance(module, FusedBTTLinear)]
    merged = [(name, model.get_submodule(name).to_linear()) for name in names]
    for name, linear in merged:
        parent, attr = _split_name(model, name)
        setattr(parent, attr, linear)
    return model
