"""Whole-model API: convert the linears of any PyTorch / Hugging Face model to FuRA, and back."""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FuRAConfig
from .cores import QUANT_TYPES, NF4Core
from .factorization import qfura_layout_problem, resolve_block_shape, resolve_roles
from .layer import FusedBTTLinear
from .qlayer import QFusedBTTLinear

TargetModules = str | Iterable[str]
ALL_LINEAR = "all-linear"


@dataclass
class ConversionReport:
    """What `convert_to_fura` did.

    Parameter counts are counted as users count them (PEFT does the same for 4-bit bases): an
    NF4 frozen core counts as the number of values it stores, not as its packed bytes.
    """

    converted: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    quantize: str | None = None
    nf4_bytes: int = 0  # bytes of the NF4 frozen cores
    max_nf4_relative_error: float = 0.0  # worst per-layer quantisation error of a frozen core
    aliases: dict[str, list[str]] = field(default_factory=dict)  # converted name -> its other names
    refused: dict[str, str] = field(default_factory=dict)  # matched but not converted: name -> why

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def converted_patterns(self) -> list[str]:
        """The converted names with layer numbers folded: `model.layers.{0-31}.self_attn.q_proj`."""
        groups: dict[str, list[int]] = {}
        for name in self.converted:
            numbers = [int(n) for n in re.findall(r"(?<=\.)\d+(?=\.|$)", name)]
            key = re.sub(r"(?<=\.)\d+(?=\.|$)", "#", name)
            groups.setdefault(key, []).append(numbers[0] if len(numbers) == 1 else -1)
        patterns = []
        for key, numbers in groups.items():
            if "#" not in key or -1 in numbers:
                patterns += [n for n in self.converted if re.sub(r"(?<=\.)\d+(?=\.|$)", "#", n) == key]
                continue
            ordered = sorted(set(numbers))
            run = (
                f"{ordered[0]}-{ordered[-1]}"
                if ordered == list(range(ordered[0], ordered[-1] + 1))
                else (",".join(map(str, ordered)))
            )
            patterns.append(key.replace("#", "{" + run + "}" if len(ordered) > 1 else str(ordered[0])))
        return patterns

    def __str__(self) -> str:
        text = (
            f"FuRA: converted {len(self.converted)} linear layers ({', '.join(self.converted_patterns())}); "
            f"trainable parameters {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_fraction:.3f}%)"
        )
        if self.quantize:
            text += (
                f"; frozen cores in {self.quantize}: {self.nf4_bytes:,} bytes, worst relative "
                f"quantisation error {self.max_nf4_relative_error:.2e}"
            )
        if self.refused:
            text += "; not converted: " + "; ".join(f"{name} ({why})" for name, why in self.refused.items())
        return text


def _normalize_patterns(patterns: Any, arg: str) -> str | list[str] | None:
    """A regex string, `all-linear`, or a list of suffixes (any iterable, read once), checked."""
    expected = (
        f"{arg} must be a list of module-name suffixes, a regex string"
        f"{' or ' + repr(ALL_LINEAR) if arg == 'target_modules' else ''}"
    )
    if patterns is None:
        if arg == "target_modules":
            raise TypeError(f"convert_to_fura: {expected}; got None")
        return None
    if isinstance(patterns, str):
        if patterns == ALL_LINEAR and arg == "target_modules":
            return patterns
        try:
            re.compile(patterns)
        except re.error as err:
            raise ValueError(f"convert_to_fura: {arg}={patterns!r} is not a valid regex: {err}") from None
        return patterns
    if not isinstance(patterns, Iterable):
        raise TypeError(f"convert_to_fura: {expected}; got {patterns!r}")
    items = list(patterns)  # a generator can be read only once
    if not all(isinstance(p, str) for p in items):
        raise TypeError(f"convert_to_fura: {expected}; got {items!r}")
    return items


def _name_matches(name: str, patterns: str | list[str]) -> bool:
    """PEFT-style matching: a regex string must match the whole name; a list matches a name
    equal to an entry or ending in '.' + entry."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each submodule is reachable under (a module shared as `s.b = s.a` has two),
    keyed by `id(module)`, in `named_modules` order; the first name is the primary one."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """`(parent module, attribute)` of a dotted module name."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


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


# Modules that read a child linear's weight themselves instead of calling the child, so a FuRA
# layer in its place would never run (or would crash on `.weight`): parent type -> child names.
READS_CHILD_WEIGHTS: dict[type, tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),  # F.multi_head_attention_forward takes out_proj.weight
    nn.TransformerEncoderLayer: ("linear1", "linear2"),  # its inference fast path takes linear*.weight
}


def _refusal(model: nn.Module, names: list[str], linear: nn.Linear, owners: dict[int, list[str]]) -> str | None:
    """Why converting this linear would change what the model computes, or None if it is safe."""
    if type(linear).forward is not nn.Linear.forward:
        return f"{type(linear).__name__} overrides nn.Linear.forward; a FuRA layer would drop its own computation"
    for name in names:
        parent, attr = split_name(model, name)
        for parent_type, children in READS_CHILD_WEIGHTS.items():
            if isinstance(parent, parent_type) and attr in children:
                return (
                    f"nn.{parent_type.__name__} reads {attr}.weight itself instead of calling {attr}, so a FuRA "
                    "layer there would not run"
                )
    for param_name in ("weight", "bias"):
        param = getattr(linear, param_name, None)
        others = (
            [o for o in owners.get(id(param), []) if o.rpartition(".")[0] not in names] if param is not None else []
        )
        if others:
            return f"its {param_name} is shared with {others[0]} (tied weights); converting it would untie them"
    if not linear.weight.dtype.is_floating_point:
        return f"its weight dtype {linear.weight.dtype} is not floating point (a quantised linear)"
    return None


@dataclass
class _Selection:
    targets: list[tuple[list[str], nn.Linear]]  # (every name, module) of each linear to convert
    refused: dict[str, str]
    converted_matches: list[str]  # FuRA layers the patterns match (for "already converted")


def _select(model: nn.Module, target_modules: Any, exclude_modules: Any) -> _Selection:
    target_modules = _normalize_patterns(target_modules, "target_modules")
    exclude_modules = _normalize_patterns(exclude_modules, "exclude_modules")
    skip = _output_layer_names(model) if target_modules == ALL_LINEAR else set()
    param_owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        param_owners.setdefault(id(param), []).append(name)
    modules = dict(model.named_modules(remove_duplicate=False))
    selection = _Selection([], {}, [])

    def selected(names: list[str]) -> bool:
        if target_modules != ALL_LINEAR and not any(_name_matches(n, target_modules) for n in names):
            return False
        return exclude_modules is None or not any(_name_matches(n, exclude_modules) for n in names)

    for names in module_names(model).values():
        module = modules[names[0]]
        if isinstance(module, FusedBTTLinear):
            if selected(names):
                selection.converted_matches.append(names[0])
            continue
        if not isinstance(module, nn.Linear) or any(n in skip for n in names) or not selected(names):
            continue
        reason = _refusal(model, names, module, param_owners)
        if reason:
            selection.refused[names[0]] = reason
        else:
            selection.targets.append((names, module))
    return selection


def find_target_linears(
    model: nn.Module, target_modules: TargetModules, exclude_modules: TargetModules | None = None
) -> list[str]:
    """Names of the `nn.Linear` modules that `target_modules` selects, `exclude_modules` does not,
    and that are safe to convert (one name per module; a shared module is selected once)."""
    return [names[0] for names, _ in _select(model, target_modules, exclude_modules).targets]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts, each shared tensor counted once. Quantised weights
    count as the values they hold: an NF4 core of QFuRA, and bitsandbytes' packed 4-bit
    parameters (two values a byte), as PEFT counts them."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        numel = p.numel()
        if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values in each byte
            numel *= 2 * p.element_size()
        total += numel
        if p.requires_grad:
            trainable += numel
    total += sum(core.shape[0] * core.shape[1] for core in model.modules() if isinstance(core, NF4Core))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable and total parameter counts, in the words and format of PEFT's
    `print_trainable_parameters`, counted as `count_parameters` counts them."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


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
    selection = _select(model, target_modules, exclude_modules)
    if not selection.targets:
        _raise_nothing_to_convert(model, selection, target_modules, exclude_modules)
    _warn_unused_exclusion(model, exclude_modules)
    on_meta = [names[0] for names, linear in selection.targets if linear.weight.device.type == "meta"]
    if on_meta and device is None and len(on_meta) < len(selection.targets):
        real = [names[0] for names, linear in selection.targets if linear.weight.device.type != "meta"]
        raise ValueError(
            f"convert_to_fura: layers {on_meta[:4]} are on the meta device (no values) but {real[:4]} hold real "
            "weights: a FuRA layer built from meta has no values and would fail at its first use. Load the whole "
            "model's weights first (or convert a model that is all on meta, for shapes and counts)"
        )
    if selection.refused:
        warnings.warn(
            "convert_to_fura: left these matched linears as they are: "
            + "; ".join(f"{name}: {why}" for name, why in selection.refused.items()),
            stacklevel=2,
        )
    model_config = getattr(model, "config", None)
    for names, linear in selection.targets:  # fail fast, before any SVD: shapes, head counts, ranks, QFuRA layout
        shape = resolve_block_shape(linear.in_features, linear.out_features, config, names[0], model_config)
        if quantize is not None:
            problem = qfura_layout_problem(shape, resolve_roles(shape, config), config)
            if problem:
                raise ValueError(f"convert_to_fura: layer {names[0]!r} cannot be QFuRA: {problem}")

    requires_grad_before = {id(p): p.requires_grad for p in model.parameters()}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for names, original in tqdm(selection.targets, desc="FuRA: converting", unit="layer", disable=not progress):
            source = _on_device(original, device)
            if quantize is None:
                layer = FusedBTTLinear.from_linear(source, config, module_name=names[0], model_config=model_config)
            else:
                layer = QFusedBTTLinear.from_linear(
                    source, config, double_quant=double_quant, module_name=names[0], model_config=model_config
                )
            del source
            for name in names:  # a shared module stays one layer under every name
                parent, attr = split_name(model, name)
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
    attach_model_methods(model)
    trainable, total = count_parameters(model)
    report = ConversionReport(
        converted=[names[0] for names, _ in selection.targets],
        trainable_params=trainable,
        total_params=total,
        quantize=quantize,
        aliases={names[0]: names[1:] for names, _ in selection.targets if len(names) > 1},
        refused=selection.refused,
    )
    cores = [m for m in model.modules() if isinstance(m, NF4Core)]
    if quantize is not None and cores:
        report.nf4_bytes = sum(core.storage_bytes() for core in cores)
        errors = [m.nf4_relative_error for m in model.modules() if isinstance(m, QFusedBTTLinear)]
        report.max_nf4_relative_error = max((e for e in errors if e == e), default=0.0)
    return report


def _raise_nothing_to_convert(model: nn.Module, selection: _Selection, target_modules, exclude_modules) -> None:
    patterns = f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r})"
    if selection.refused:
        raise ValueError(
            f"convert_to_fura: {patterns} matched only linears that cannot be converted safely: "
            + "; ".join(f"{name}: {why}" for name, why in selection.refused.items())
        )
    if selection.converted_matches:
        sample = ", ".join(selection.converted_matches[:4]) + (", ..." if len(selection.converted_matches) > 4 else "")
        raise ValueError(
            f"convert_to_fura: {type(model).__name__} is already converted: {patterns} matches FuRA layers "
            f"({sample}) and no plain nn.Linear. To load trained weights use load_fura_adapter; to convert again, "
            "merge_fura(model) first"
        )
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    sample = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
    # transformers' Conv1D (GPT-2 and its kin) is a linear with a transposed weight, not an nn.Linear.
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    conv1d_note = (
        f". Its {len(conv1d)} Conv1D layers ({', '.join(conv1d[:4])}{', ...' if len(conv1d) > 4 else ''}) are "
        "transformers' transposed linears (GPT-2 style), which FuRA does not convert: only nn.Linear is supported"
        if conv1d
        else ""
    )
    raise ValueError(
        f"convert_to_fura: {patterns} matched no nn.Linear in {type(model).__name__}; its linears are: "
        f"{sample or 'none'}{conv1d_note}"
    )


def _warn_unused_exclusion(model: nn.Module, exclude_modules: Any) -> None:
    """An exclusion that matches no module is almost always a misspelt one, or a bare name given
    as a string (a string is a regex that must match the whole name, as in PEFT)."""
    patterns = _normalize_patterns(exclude_modules, "exclude_modules")
    if patterns is None or any(_name_matches(name, patterns) for name, _ in model.named_modules()):
        return
    hint = (
        f" (a string is a regex that must match the whole module name: for every '{patterns}' layer write "
        f"['{patterns}'] or r'.*\\.{patterns}')"
        if isinstance(patterns, str) and re.fullmatch(r"[\w.]+", patterns)
        else ""
    )
    warnings.warn(f"convert_to_fura: exclude_modules={exclude_modules!r} matches no module, so nothing is "
                  f"excluded{hint}", stacklevel=3)  # fmt: skip


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
    """Replace every `FusedBTTLinear` in `model` with its merged `nn.Linear`, in place (a layer
    shared under several names stays one module under all of them).

    Returns the model (or the merged linear, when `model` is itself a `FusedBTTLinear`).
    """
    if isinstance(model, FusedBTTLinear):
        return model.to_linear()
    modules = dict(model.named_modules(remove_duplicate=False))
    merged = [
        (names, modules[names[0]].to_linear())
        for names in module_names(model).values()
        if isinstance(modules[names[0]], FusedBTTLinear)
    ]
    for names, linear in merged:
        for name in names:
            parent, attr = split_name(model, name)
            setattr(parent, attr, linear)
    return model


def attach_model_methods(model: nn.Module) -> None:
    """Give a converted model FuRA-aware `save_pretrained` (a transformers model), PEFT's
    `print_trainable_parameters`, and a load hook that loads the adapter saved with a checkpoint's
    merged weights (`fura_kernels.adapters.fura_save_pretrained`, `load_adapter_saved_with_weights`)."""
    from .adapters import fura_save_pretrained, load_adapter_saved_with_weights

    if isinstance(model, FusedBTTLinear):
        return
    if not getattr(model, "_fura_load_hook", False):
        model._register_load_state_dict_pre_hook(load_adapter_saved_with_weights, with_module=True)
        model._fura_load_hook = True
    # functools.partial, not a bound method: it pickles by value, so a whole converted model still
    # round-trips through torch.save / torch.load (a bound method would be looked up by its
    # function's name on load, and fail).
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = functools.partial(fura_save_pretrained, model)
    model.print_trainable_parameters = functools.partial(print_trainable_parameters, model)
