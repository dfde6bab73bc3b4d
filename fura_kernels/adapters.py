"""FuRA adapter files (safetensors + JSON, no pickle) and merged export.

An adapter holds only what training changed: the trainable tensors of every FuRA layer. The
frozen core is not stored; loading re-decomposes the base weight, which is why the base must be
the same one: each layer records a fingerprint of its base weight (checked before anything is
touched) and a probe of its frozen core (checked after re-decomposition, which catches a basis
that came out different, FURA_SPEC.md §6).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FuRAConfig
from .distributed import full_tensor, is_rank0
from .factorization import weight_fingerprint
from .layer import FusedBTTLinear
from .qlayer import QFusedBTTLinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "fura_config.json"
FORMAT = "fura-adapter"
FORMAT_VERSION = 1
PROBE_SAMPLES = 64  # frozen-core values compared after re-decomposition
PROBE_TOLERANCE = 1e-3  # relative; a sign flip or a rotated basis moves these by O(1)


def _core_probe(layer: FusedBTTLinear) -> list[float]:
    if isinstance(layer, QFusedBTTLinear):
        core = layer.dequantized_l(torch.float32)
    else:
        core = full_tensor(layer.btt_l.detach()).float()
    flat = core.reshape(-1)
    step = max(1, flat.numel() // PROBE_SAMPLES)
    return flat[::step][:PROBE_SAMPLES].cpu().tolist()


def _fura_layers(model: nn.Module) -> dict[str, FusedBTTLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedBTTLinear)}


def degenerate_layers(model: nn.Module) -> list[str]:
    """FuRA layers whose decomposition had repeated or zero singular values in some block: there
    the SVD basis is not unique, so a re-decomposition may rotate it."""
    return [name for name, layer in _fura_layers(model).items() if layer.degenerate_blocks]


def save_fura_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write `adapter_model.safetensors` (trainable tensors only) and `fura_config.json`.

    Under FSDP2 every rank must call it: sharded tensors are gathered in full, and rank 0 writes.
    """
    layers = _fura_layers(model)
    if not layers:
        raise ValueError(f"save_fura_adapter: {type(model).__name__} has no FuRA layers to save")
    missing = [n for n, layer in layers.items() if getattr(layer, "base_fingerprint", None) is None]
    if missing:
        raise ValueError(
            f"save_fura_adapter: layers {missing[:5]} carry no base-weight fingerprint (built on the meta device "
            "or by hand); convert the real base weights with convert_to_fura or from_linear"
        )
    configs = {json.dumps(layer.config.to_dict(), sort_keys=True) for layer in layers.values()}
    if len(configs) != 1:
        raise ValueError("save_fura_adapter: the FuRA layers use different configs; one adapter holds one config")
    degenerate = degenerate_layers(model)
    if degenerate:
        warnings.warn(
            f"save_fura_adapter: layers {degenerate} have repeated or zero singular values; their SVD basis is not "
            "unique, so loading this adapter onto a re-decomposed base may not reproduce them exactly",
            stacklevel=2,
        )
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        trainable = {p_name: p for p_name, p in layer.named_parameters() if p.requires_grad}
        for p_name, p in trainable.items():
            tensors[f"{name}.{p_name}"] = full_tensor(p.detach()).contiguous().cpu()
        shape = layer.block_shape
        entries[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
            "block_shape": {"m": shape.m, "n": shape.n, "a": shape.a, "b": shape.b, "r": shape.r},
            "tensors": sorted(trainable),
            "base_fingerprint": layer.base_fingerprint,
            "core_probe": _core_probe(layer),
            "quantize": "nf4" if isinstance(layer, QFusedBTTLinear) else None,
            "double_quant": getattr(layer, "double_quant", None),
        }
    from . import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fura_kernels_version": __version__,
        "config": first.config.to_dict(),
        "layers": entries,
        "degenerate_layers": degenerate,
    }
    directory = Path(directory)
    if not is_rank0():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
    meta["weights_sha256"] = _sha256(directory / ADAPTER_WEIGHTS)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"load_fura_adapter: {path} does not exist")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_fura_adapter: {config_path} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_fura_adapter: {config_path} is not a {FORMAT} v{FORMAT_VERSION} file "
            f"(format={meta.get('format')!r}, version={meta.get('format_version')!r})"
        )
    if meta.get("weights_sha256") != _sha256(weights_path):
        raise ValueError(
            f"load_fura_adapter: {weights_path} does not match the checksum in {config_path}: "
            "the file was modified or belongs to another adapter"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"load_fura_adapter: {weights_path} is corrupt: {err}") from None
    return meta, tensors


def _validate(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every check that needs no conversion: names, shapes, fingerprints, tensor inventory."""
    expected: set[str] = set()
    for name, entry in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_fura_adapter: the base model has no module {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"load_fura_adapter: {name!r} is a {type(module).__name__}, expected the base nn.Linear")
        if (module.in_features, module.out_features) != (entry["in_features"], entry["out_features"]):
            raise ValueError(
                f"load_fura_adapter: {name!r} is {module.in_features}->{module.out_features} in the base, "
                f"{entry['in_features']}->{entry['out_features']} in the adapter"
            )
        if weight_fingerprint(module.weight) != entry["base_fingerprint"]:
            raise ValueError(
                f"load_fura_adapter: the base weight of {name!r} is not the one this adapter was trained on "
                "(fingerprint mismatch): load the same base checkpoint, in the same dtype"
            )
        expected.update(f"{name}.{t}" for t in entry["tensors"])
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise ValueError(
            f"load_fura_adapter: tensor inventory mismatch: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
        )


def load_fura_adapter(model: nn.Module, directory: str | Path, *, progress: bool = True) -> nn.Module:
    """Convert a freshly loaded base `model` the way the adapter's model was, and load the trained
    tensors. Checks everything first; on any error the model is left exactly as it was."""
    from .model import convert_to_fura

    meta, tensors = _read_adapter(Path(directory))
    _validate(model, meta, tensors)
    config = FuRAConfig(**meta["config"])
    names = list(meta["layers"])
    quantize = {entry["quantize"] for entry in meta["layers"].values()}
    if len(quantize) != 1:
        raise ValueError("load_fura_adapter: the adapter mixes quantised and plain layers")
    quantize_as = quantize.pop()
    double_quant = all(e["double_quant"] is not False for e in meta["layers"].values())
    originals = {name: model.get_submodule(name) for name in names}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    convert_to_fura(model, names, config, quantize=quantize_as, double_quant=double_quant, progress=progress)
    try:
        for name, entry in meta["layers"].items():
            layer = model.get_submodule(name)
            shape = layer.block_shape
            if [shape.m, shape.n, shape.a, shape.b, shape.r] != [entry["block_shape"][k] for k in "mnabr"]:
                raise ValueError(
                    f"load_fura_adapter: {name!r} decomposed to {shape}, adapter has {entry['block_shape']}"
                )
            probe = torch.tensor(_core_probe(layer))
            stored = torch.tensor(entry["core_probe"])
            if (probe - stored).abs().max() > PROBE_TOLERANCE * stored.abs().max().clamp(min=1e-30):
                raise ValueError(
                    f"load_fura_adapter: the re-decomposed frozen core of {name!r} differs from the one the adapter "
                    "was trained against (another SVD basis); it cannot be applied"
                )
            params = dict(layer.named_parameters())
            for t_name in entry["tensors"]:
                value = tensors[f"{name}.{t_name}"]
                if params[t_name].shape != value.shape:
                    raise ValueError(
                        f"load_fura_adapter: {name}.{t_name} has shape {tuple(value.shape)} in the adapter, "
                        f"{tuple(params[t_name].shape)} in the layer"
                    )
            with torch.no_grad():
                for t_name in entry["tensors"]:
                    params[t_name].copy_(tensors[f"{name}.{t_name}"])
    except BaseException:
        for name, original in originals.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, original)
        for p in model.parameters():
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        raise
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every FuRA layer replaced by its merged `weight` (and `bias`)."""
    layers = _fura_layers(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in layers:
            continue
        state[key] = value
    with torch.no_grad():
        for name, layer in layers.items():
            merged = layer.to_linear()
            state[f"{name}.weight"] = merged.weight.detach()
            if merged.bias is not None:
                state[f"{name}.bias"] = merged.bias.detach()
    return state


def save_merged(model: nn.Module, directory: str | Path, **save_pretrained_kwargs: Any) -> Path:
    """Save a Hugging Face model with its FuRA layers merged, as `save_pretrained` would save the
    base: it reloads with `AutoModelForCausalLM.from_pretrained` and gives the same outputs. The
    in-memory model is not changed."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_merged: {type(model).__name__} has no save_pretrained (a transformers model is needed)")
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=merged_state_dict(model), **save_pretrained_kwargs)
    return directory
