"""FuRA adapter files (safetensors + JSON, no pickle), merged export, and `save_pretrained`.

An adapter holds only what training changed: the trainable tensors of every FuRA layer. The
frozen tensors are not stored; loading onto a plain base re-decomposes the base weight, which is
why the base must be the same one: each layer records a fingerprint of its base weight's values
(checked before anything is touched; the same weights in fp32, fp64 or bf16 are one base) and a
probe of its frozen tensors (checked after re-decomposition, which catches a basis that came out
different, FURA_SPEC.md §6). A core that trains is stored, never probed. Loading onto a model that
is already converted checks the same two things against the layers in place, loads the trained
tensors, and puts the base back in every FuRA layer the adapter does not cover (an adapter swap
gives exactly "base + the new adapter").

The JSON is validated against a schema, and one checksum covers it and the weights file, so a
hand-edited or truncated adapter is refused. Tensor names are limited to each layer's trainable
tensors, and dtypes, shapes and finiteness are checked before anything is loaded. Every failure
raises a ValueError naming the layer and the value, and leaves the model exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FuRAConfig
from .cores import DenseCore
from .distributed import full_tensor, is_rank0
from .factorization import (
    frozen_l_from_weight,
    legacy_weight_fingerprint,
    resolve_block_shape,
    resolve_roles,
    weight_fingerprint,
)
from .layer import FusedBTTLinear
from .model import convert_to_fura, module_names, split_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "fura_config.json"
# Where `save_pretrained` of a converted model writes the adapter, beside the merged weights.
ADAPTER_SUBDIR = "fura_adapter"
FORMAT = "fura-adapter"
# v2: the checksum covers the JSON too; the dense L core is named l_core.btt_l.
# v3: the base fingerprint hashes values (dtype-free), the probe covers the frozen tensors only
# (with their dtype), trained tensors are stored in the config's trainable dtype.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
PROBE_SAMPLES = 64  # frozen-core values compared after re-decomposition
PROBE_TOLERANCE = 1e-3  # relative; a sign flip or a rotated basis moves these by O(1)
# In units of the coarser dtype's eps: a frozen core stored in bf16 on one side and fp32 on the
# other differs by its rounding, and a base rounded to bf16 re-decomposes to a basis that moves
# by that rounding over the singular-value gaps.
PROBE_EPS_FACTOR = 16
TRAINABLE_TENSORS = ("btt_r", "btt_s", "bias", "l_core.btt_l")
INITIAL_TENSORS = ("btt_r", "btt_s")

_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_POSITIVE = {"type": "integer", "minimum": 1}
_LAYER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "in_features",
        "out_features",
        "bias",
        "block_shape",
        "tensors",
        "aliases",
        "base_fingerprint",
        "core_probe",
        "quantize",
        "double_quant",
    ],  # fmt: skip
    "properties": {
        "in_features": _POSITIVE,
        "out_features": _POSITIVE,
        "bias": {"type": "boolean"},
        "block_shape": {
            "type": "object",
            "additionalProperties": False,
            "required": list("mnabr"),
            "properties": {k: _POSITIVE for k in "mnabr"},
        },
        "tensors": {"type": "array", "uniqueItems": True, "items": {"enum": list(TRAINABLE_TENSORS)}},
        "aliases": {"type": "array", "items": {"type": "string"}},
        "base_fingerprint": _HEX64,
        "core_probe": {"type": "array", "items": {"type": "number"}},
        "probe_dtype": {"enum": ["float64", "float32", "float16", "bfloat16"]},
        "quantize": {"enum": [None, "nf4"]},
        # Fingerprint of the merged weight `save_pretrained` wrote beside the adapter, if it did.
        "merged_fingerprint": _HEX64,
        # Decomposition-time tensors stored as `<layer>.initial.<name>`: with them a load rebuilds the
        # frozen L from the base weight itself (factorization.frozen_l_from_weight), no SVD.
        "initial": {"type": "array", "uniqueItems": True, "items": {"enum": list(INITIAL_TENSORS)}},
        "double_quant": {"type": ["boolean", "null"]},
    },
}
ADAPTER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "format",
        "format_version",
        "fura_kernels_version",
        "config",
        "layers",
        "degenerate_layers",
        "weights_sha256",
        "checksum",
    ],  # fmt: skip
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"enum": list(READABLE_VERSIONS)},
        "fura_kernels_version": {"type": "string"},
        "config": {"type": "object"},  # FuRAConfig validates its own fields
        "layers": {"type": "object", "minProperties": 1, "additionalProperties": _LAYER_SCHEMA},
        "degenerate_layers": {"type": "array", "items": {"type": "string"}},
        "weights_sha256": _HEX64,
        "checksum": _HEX64,
    },
}


def _fura_layers(model: nn.Module) -> dict[str, tuple[FusedBTTLinear, list[str]]]:
    """Primary name -> (FuRA layer, its other names), each shared layer once."""
    modules = dict(model.named_modules(remove_duplicate=False))
    return {
        names[0]: (modules[names[0]], names[1:])
        for names in module_names(model).values()
        if isinstance(modules[names[0]], FusedBTTLinear)
    }


def _layer_state(name: str, layer: FusedBTTLinear, state_dict: Mapping[str, torch.Tensor] | None) -> dict:
    """A layer's own state dict, from `state_dict` (a model's full state dict) when given, else
    from the layer, gathered in full if sharded (a collective under FSDP2: every rank calls)."""
    if state_dict is None:
        return {k: full_tensor(v) for k, v in layer.state_dict().items()}
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _core_probe(values: torch.Tensor) -> list[float]:
    flat = values.reshape(-1)
    step = max(1, flat.numel() // PROBE_SAMPLES)
    return flat[::step][:PROBE_SAMPLES].float().cpu().tolist()


def _frozen_tensors(
    layer: FusedBTTLinear, state: Mapping[str, torch.Tensor] | None = None
) -> list[tuple[torch.Tensor, torch.dtype]]:
    """The layer's tensors that an adapter does not store (a load re-decomposes them), each with
    the dtype it is stored in: the L core, R and S, each when frozen. From `state` (the layer's
    own state dict) when given."""
    roles = layer.roles
    tensors = dict(layer.named_parameters()) if state is None else state
    frozen = []
    if not roles.train_l:
        core_state = (
            None if state is None else {k[len("l_core.") :]: v for k, v in state.items() if k.startswith("l_core.")}
        )
        frozen.append((layer.l_core.probe_values(core_state), layer.l_core.dtype))
    if not roles.train_r:
        frozen.append((tensors["btt_r"].detach(), tensors["btt_r"].dtype))
    if tensors.get("btt_s") is not None and not roles.s_trainable:
        frozen.append((tensors["btt_s"].detach(), tensors["btt_s"].dtype))
    return frozen


def _initial_tensors(layer: FusedBTTLinear) -> dict[str, torch.Tensor]:
    """R and S as decomposed, for a layer whose L is frozen and R trains (the default layout) and
    that was decomposed here; empty otherwise (a load then re-decomposes and checks the probe)."""
    initial = getattr(layer, "initial_trainables", None)
    if layer.roles.train_l or not initial or "btt_r" not in initial:
        return {}
    return {t: initial[t] for t in INITIAL_TENSORS if t in initial}


def _frozen_probe(layer: FusedBTTLinear, state: Mapping[str, torch.Tensor] | None = None) -> tuple[list[float], str]:
    """Samples of every frozen tensor, and the coarsest dtype among them."""
    frozen = _frozen_tensors(layer, state)
    probe = [v for t, _ in frozen for v in _core_probe(t)]
    dtypes = [dtype for _, dtype in frozen] or [torch.float32]
    coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps)
    return probe, str(coarsest).removeprefix("torch.")


def _fingerprint_hex(state: Mapping[str, torch.Tensor]) -> str | None:
    digest = state["fingerprint_sha256"]
    return bytes(digest.cpu().tolist()).hex() if bool(digest.any()) else None


def degenerate_layers(model: nn.Module) -> list[str]:
    """FuRA layers whose decomposition had repeated or zero singular values in some block: there
    the SVD basis is not unique, so a re-decomposition may rotate it."""
    return [name for name, (layer, _) in _fura_layers(model).items() if layer.degenerate_blocks]


def _trainable_names(layer: FusedBTTLinear) -> list[str]:
    return sorted(name for name, p in layer.named_parameters() if p.requires_grad)


def save_fura_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    merged_fingerprints: Mapping[str, str] | None = None,
) -> Path:
    """Write `adapter_model.safetensors` (trainable tensors only) and `fura_config.json`.

    The tensors come from the model, or from `state_dict` (the model's full state dict, as HF
    Trainer passes it under FSDP or DeepSpeed). Without `state_dict`, under FSDP2 every rank must
    call it: sharded tensors are gathered in full, and rank 0 writes. `merged_fingerprints` (layer
    name -> fingerprint of the merged weight written beside the adapter) ties the adapter to those
    weights. The two files are written to a temporary folder first and moved into place, so an
    interrupted save never leaves a file half written.
    """
    layers = _fura_layers(model)
    if not layers:
        raise ValueError(f"save_fura_adapter: {type(model).__name__} has no FuRA layers to save")
    states = {name: _layer_state(name, layer, state_dict) for name, (layer, _) in layers.items()}
    missing = [name for name, state in states.items() if _fingerprint_hex(state) is None]
    if missing:
        raise ValueError(
            f"save_fura_adapter: layers {missing[:5]} carry no base-weight fingerprint (built on the meta device "
            "or by hand); convert the real base weights with convert_to_fura or from_linear"
        )
    configs = {json.dumps(layer.config.to_dict(), sort_keys=True) for layer, _ in layers.values()}
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
    for name, (layer, aliases) in layers.items():
        state = states[name]
        trainable = _trainable_names(layer)
        for t_name in trainable:
            # In the trainable dtype whatever the model was cast to (DeepSpeed's bf16 mode casts the
            # whole model): the load expects it, and a bf16 value is exact in fp32.
            tensors[f"{name}.{t_name}"] = state[t_name].detach().to(layer.config.trainable_dtype).contiguous().cpu()
        probe, probe_dtype = _frozen_probe(layer, state)
        initial = _initial_tensors(layer)
        for t_name, value in initial.items():
            tensors[f"{name}.initial.{t_name}"] = value.to(layer.config.trainable_dtype).contiguous()
        shape = layer.block_shape
        entries[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
            "block_shape": {k: getattr(shape, k) for k in "mnabr"},
            "tensors": trainable,
            "aliases": aliases,
            "base_fingerprint": _fingerprint_hex(state),
            "core_probe": probe,
            "probe_dtype": probe_dtype,
            "quantize": layer.l_core.quant_type,
            "double_quant": layer.l_core.double_quant,
        }
        if merged_fingerprints is not None:
            entries[name]["merged_fingerprint"] = merged_fingerprints[name]
        if initial:
            entries[name]["initial"] = sorted(initial)
    from . import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fura_kernels_version": __version__,
        "config": next(iter(layers.values()))[0].config.to_dict(),
        "layers": entries,
        "degenerate_layers": degenerate,
    }
    directory = Path(directory)
    if not is_rank0():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
        meta["weights_sha256"] = _sha256_file(staging / ADAPTER_WEIGHTS)
        meta["checksum"] = _checksum(meta)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        if directory.is_dir():
            # A folder that exists may hold other files (a VLM's projector): replace the two files
            # one by one. Stopped between the two, the checksum refuses the mixed pair on load.
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                os.replace(staging / name, directory / name)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum(meta: dict) -> str:
    """sha256 of the canonical JSON of everything but the checksum itself (which includes the
    weights file's own sha256), so an edit to either file is caught."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"load_fura_adapter: {path} does not exist")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_fura_adapter: {config_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"load_fura_adapter: {config_path} is not a {FORMAT} file")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ValueError(
            f"load_fura_adapter: {config_path} has format_version={version!r}; this fura-kernels reads versions "
            f"{list(READABLE_VERSIONS)} (re-save the adapter with this version)"
        )
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(ADAPTER_SCHEMA).iter_errors(meta))
    if error is not None:
        raise ValueError(f"load_fura_adapter: {config_path}: at {error.json_path}: {error.message}")
    for name, entry in meta["layers"].items():
        if not all(math.isfinite(v) for v in entry["core_probe"]):
            raise ValueError(f"load_fura_adapter: {config_path}: layer {name!r} has a non-finite core_probe value")
    if meta["checksum"] != _checksum(meta):
        raise ValueError(
            f"load_fura_adapter: {config_path} does not match its checksum: the metadata was edited or corrupted"
        )
    if meta["weights_sha256"] != _sha256_file(weights_path):
        raise ValueError(
            f"load_fura_adapter: {weights_path} does not match the checksum in {config_path}: "
            "the file was modified or belongs to another adapter"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"load_fura_adapter: {weights_path} is corrupt: {err}") from None
    return meta, tensors


def _expected_tensors(layer_or_shape, config: FuRAConfig, bias: bool) -> dict[str, tuple[tuple, torch.dtype]]:
    """Trainable tensor name -> (shape, dtype) for a FuRA layer, or for the layer a plain linear
    of that block shape becomes under `config`."""
    if isinstance(layer_or_shape, FusedBTTLinear):
        params = dict(layer_or_shape.named_parameters())
        return {name: (tuple(params[name].shape), params[name].dtype) for name in _trainable_names(layer_or_shape)}
    shape = layer_or_shape
    roles = resolve_roles(shape, config)
    m, n, a, b, r = (getattr(shape, k) for k in "mnabr")
    dtype = config.trainable_dtype
    expected = {}
    if roles.train_r:
        expected["btt_r"] = ((n, b, m * r), dtype)
    if roles.s_trainable:
        expected["btt_s"] = ((m, n, r), dtype)
    if bias and config.train_bias:
        expected["bias"] = ((m * a,), dtype)
    if roles.train_l:
        expected["l_core.btt_l"] = ((m, n * r, a), dtype)
    return expected


def _check_probe(name: str, layer: FusedBTTLinear, entry: dict, version: int) -> None:
    """The layer's frozen tensors must be the ones the adapter was trained against, to the
    rounding of the coarser of the two dtypes."""
    if version == 2:
        if layer.roles.train_l:
            return  # version 2 probed L even where it trains; the adapter holds that L itself
        probe, dtype = _core_probe(layer.l_core.probe_values()), str(layer.l_core.dtype).removeprefix("torch.")
    else:
        probe, dtype = _frozen_probe(layer)
    stored = entry["core_probe"]
    if len(probe) != len(stored):
        raise ValueError(
            f"load_fura_adapter: the frozen tensors of {name!r} give {len(probe)} probe values, the adapter "
            f"{len(stored)}: the layer freezes other tensors than the one the adapter was trained on"
        )
    if not stored:
        return  # nothing is frozen: every tensor comes from the adapter
    stored_dtype = entry.get("probe_dtype", dtype)
    eps = max(torch.finfo(getattr(torch, stored_dtype)).eps, torch.finfo(getattr(torch, dtype)).eps)
    tolerance = max(PROBE_TOLERANCE, PROBE_EPS_FACTOR * eps)
    ours, theirs = torch.tensor(probe, dtype=torch.float64), torch.tensor(stored, dtype=torch.float64)
    deviation = ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30)).item()
    if deviation > tolerance:
        raise ValueError(
            f"load_fura_adapter: the frozen core of {name!r} differs from the one the adapter was trained against "
            f"(relative deviation {deviation:.2e}, tolerance {tolerance:.1e} for {dtype} against the adapter's "
            f"{stored_dtype}): the base is another checkpoint, or its SVD basis came out rotated (repeated singular "
            "values); it cannot be applied"
        )


# A re-decomposed column of L is kept when it matches the rebuilt one, both in the core's dtype,
# to this many units of that dtype's eps (relative to the column's norm; at least 1e-5): the same
# base then keeps exactly the L training had. A flipped column is off by 2, a rotated one by its
# angle. An NF4 core is compared dequantised, where NF4 itself moves a column by about 10%.
SAME_COLUMN_EPS = 2
SAME_COLUMN_NF4 = 0.5


@torch.no_grad()
def _rebuild_frozen_core(layer: FusedBTTLinear, base: nn.Linear, entry: dict, initial: dict[str, torch.Tensor]) -> None:
    """Make the frozen L the one the adapter was trained against, column by column. A column of
    the re-decomposition (already in the layer) is kept where it is that basis; where it is not
    (a flipped or rotated singular vector, the base in another dtype) it is rebuilt from the
    adapter's decomposition-time R and S and this base's weight (`frozen_l_from_weight`), which
    gives the trained model on this base to the base's own rounding. Columns of singular values
    that are zero to 1e-6 of their block's largest are left as decomposed: no basis is defined
    there, and the rebuild would zero them. The layer's record of its values as decomposed
    becomes the adapter's, so a later swap puts this base back."""
    weight = base.weight.detach().double()
    rebuilt = frozen_l_from_weight(weight, initial["btt_r"], initial.get("btt_s"), layer.block_shape)
    dtype, dense = layer.l_core.dtype, isinstance(layer.l_core, DenseCore)
    current = layer.l_core.probe_values().double().to(rebuilt.device)
    comparable = rebuilt.to(dtype).double() if dense else rebuilt
    column_error = (current - comparable).norm(dim=-1) / comparable.norm(dim=-1).clamp(min=1e-30)  # (m, n*r)
    tolerance = max(SAME_COLUMN_EPS * torch.finfo(dtype).eps, 1e-5) if dense else SAME_COLUMN_NF4
    shape = layer.block_shape
    weight_of_column = initial["btt_r"].double().reshape(shape.n, shape.b, shape.m, shape.r).norm(dim=1)  # (n, m, r)
    weight_of_column = weight_of_column.permute(1, 0, 2)  # (m, n, r)
    if "btt_s" in initial:
        weight_of_column = weight_of_column * initial["btt_s"].double().abs()
    defined = weight_of_column > 1e-6 * weight_of_column.amax(dim=-1, keepdim=True)
    replace = (column_error.to(defined.device).reshape(defined.shape) > tolerance) & defined
    if bool(replace.any()):
        mask = replace.reshape(shape.m, shape.n * shape.r, 1).to(current.device)
        chosen = torch.where(mask, rebuilt, current)
        if dense:
            layer.l_core.btt_l.copy_(chosen)
        else:
            layer.nf4_relative_error = layer.l_core.quantize_from(chosen[0].t().to(dtype))
    record = {t: v.detach().float().cpu() for t, v in initial.items()}
    if layer.bias is not None and layer.bias.requires_grad:
        record["bias"] = base.bias.detach().to("cpu", copy=True)
    layer.initial_trainables = {t: record[t].to(p.dtype) for t, p in layer.named_parameters() if p.requires_grad}


def _check_weights_beside(directory: Path, meta: dict) -> None:
    """An adapter that `save_pretrained` wrote beside merged weights records their fingerprints;
    if the folder around it now holds other weights (saved again after `merge_fura`, or a save
    that stopped between its two writes), the pair does not belong together: refuse. One layer is
    read (the first), which is enough: a stale adapter differs from the weights in every layer."""
    name, entry = next(iter(meta["layers"].items()))
    if "merged_fingerprint" not in entry or directory.name != ADAPTER_SUBDIR:
        return
    folder, key = directory.parent, f"{name}.weight"
    index = folder / "model.safetensors.index.json"
    try:
        shard = json.loads(index.read_text())["weight_map"].get(key) if index.is_file() else "model.safetensors"
    except (OSError, ValueError, KeyError):
        return
    path = folder / shard if shard else None
    if path is None or not path.is_file():
        return
    with safe_open(str(path), framework="pt") as weights:
        if key not in weights.keys():
            return
        stored = weights.get_tensor(key)
    if weight_fingerprint(stored) != entry["merged_fingerprint"]:
        _refuse(f"{directory} does not belong to the weights beside it: {path.name} holds a {key} that is not the "
                "merged weight this adapter was saved with (the folder was saved again after the adapter, by "
                "merge_fura and save_pretrained, or a save stopped half way). Load the weights with from_pretrained, "
                "or save the FuRA model again")  # fmt: skip


def _refuse(message: str) -> NoReturn:
    raise ValueError(f"load_fura_adapter: {message}")


def _plan(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], config: FuRAConfig) -> dict[str, bool]:
    """Every check that needs no conversion. Returns name -> whether the layer is converted already."""
    model_config = getattr(model, "config", None)
    version = meta["format_version"]
    in_place: dict[str, bool] = {}
    for name, entry in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            _refuse(f"the base model has no module {name!r}")
        sizes = (entry["in_features"], entry["out_features"])
        if isinstance(module, FusedBTTLinear | nn.Linear) and (module.in_features, module.out_features) != sizes:
            _refuse(f"{name!r} is {module.in_features}->{module.out_features} in the model, {sizes[0]}->{sizes[1]} "
                    "in the adapter")  # fmt: skip
        if isinstance(module, FusedBTTLinear):
            where = f"the FuRA layer {name!r}"
            if module.config != config:
                _refuse(f"{where} was converted with {module.config}, the adapter with {config}")
            stored_as, ours = entry["quantize"] or "dense", module.l_core.quant_type or "dense"
            if ours != stored_as:
                _refuse(f"{where} stores its core as {ours}, the adapter's as {stored_as}")
            # A version 2 fingerprint hashed raw bits and dtype; the layer holds today's (values).
            if version >= 3 and module.base_fingerprint != entry["base_fingerprint"]:
                _refuse(f"{where} was converted from another base weight than the one this adapter was trained on "
                        "(fingerprint mismatch)")  # fmt: skip
            _check_probe(name, module, entry, version)
            shape, expected = module.block_shape, _expected_tensors(module, config, entry["bias"])
        elif isinstance(module, nn.Linear):
            fingerprint = weight_fingerprint if version >= 3 else legacy_weight_fingerprint
            if fingerprint(module.weight) != entry["base_fingerprint"]:
                hint = "" if version >= 3 else " in the dtype it was trained in (a version 2 adapter)"
                _refuse(f"the base weight of {name!r} is not the one this adapter was trained on (fingerprint "
                        f"mismatch, in {module.weight.dtype}): load the same base checkpoint{hint}")  # fmt: skip
            shape = resolve_block_shape(module.in_features, module.out_features, config, name, model_config)
            expected = _expected_tensors(shape, config, entry["bias"])
        else:
            _refuse(f"{name!r} is a {type(module).__name__}, expected the base nn.Linear or a FuRA layer")
        in_place[name] = isinstance(module, FusedBTTLinear)
        if [getattr(shape, k) for k in "mnabr"] != [entry["block_shape"][k] for k in "mnabr"]:
            _refuse(f"{name!r} has blocks {shape}, the adapter {entry['block_shape']}")
        if sorted(entry["tensors"]) != sorted(expected):
            _refuse(f"layer {name!r} lists tensors {sorted(entry['tensors'])}, but its trainable tensors are "
                    f"{sorted(expected)}; an adapter holds exactly those")  # fmt: skip
        for t_name, (t_shape, t_dtype) in expected.items():
            key = f"{name}.{t_name}"
            value = tensors.get(key)
            if value is None:
                continue  # reported with the inventory below
            # Any floating dtype is read (a version 2 adapter of a bf16-cast model holds bf16) and
            # cast to the layer's own on load.
            if tuple(value.shape) != t_shape or not value.dtype.is_floating_point:
                _refuse(f"{key} is {value.dtype} {tuple(value.shape)} in the adapter; expected a floating-point "
                        f"tensor of shape {t_shape} ({t_dtype})")  # fmt: skip
            if not bool(torch.isfinite(value).all()):
                _refuse(f"{key} holds NaN or inf values")
    for name, entry in meta["layers"].items():
        params = {"btt_r": (entry["block_shape"]["n"], entry["block_shape"]["b"],
                            entry["block_shape"]["m"] * entry["block_shape"]["r"]),
                  "btt_s": tuple(entry["block_shape"][k] for k in "mnr")}  # fmt: skip
        for t_name in entry.get("initial", []):
            value = tensors.get(f"{name}.initial.{t_name}")
            if value is not None and (tuple(value.shape) != params[t_name] or not value.dtype.is_floating_point
                                      or not bool(torch.isfinite(value).all())):  # fmt: skip
                _refuse(f"{name}.initial.{t_name} is {value.dtype} {tuple(value.shape)} in the adapter; expected "
                        f"finite floating-point values of shape {params[t_name]}")  # fmt: skip
    expected_keys = {f"{n}.{t}" for n, e in meta["layers"].items() for t in e["tensors"]}
    expected_keys |= {f"{n}.initial.{t}" for n, e in meta["layers"].items() for t in e.get("initial", [])}
    missing, extra = expected_keys - set(tensors), set(tensors) - expected_keys
    if missing or extra:
        _refuse(f"tensor inventory mismatch: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    return in_place


def load_fura_adapter(model: nn.Module, directory: str | Path, *, progress: bool = True) -> nn.Module:
    """Load an adapter into `model` and return it.

    A layer that is still the base `nn.Linear` is converted the way the adapter's model was
    (re-decomposed, then checked against the stored probe); a layer that is already a FuRA layer
    (to resume training or swap adapters) is checked against the adapter's fingerprint and probe
    in place. Then the trained tensors (R, S, biases, a trained core) are loaded, and every FuRA
    layer the adapter does not cover is put back to its base `nn.Linear`, so loading adapter B
    over adapter A gives exactly "base + B". Everything that can be checked is checked first; on
    any error the model is left exactly as it was."""
    meta, tensors = _read_adapter(Path(directory))
    _check_weights_beside(Path(directory), meta)
    try:
        config = FuRAConfig(**meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_fura_adapter: the adapter's config is invalid: {err}") from None
    in_place = _plan(model, meta, tensors, config)
    # FuRA layers the adapter does not cover hold another adapter's training: they go back to the base.
    uncovered = {name: layer for name, (layer, _) in _fura_layers(model).items() if name not in meta["layers"]}
    unknown = [name for name, layer in uncovered.items() if getattr(layer, "initial_trainables", None) is None]
    if unknown:
        _refuse(f"the model's FuRA layers {unknown[:5]} are not in this adapter, and their base cannot be rebuilt "
                "(they were loaded from a state dict, not decomposed here), so they would keep another adapter's "
                "training; load the adapter onto a freshly loaded base instead")  # fmt: skip
    fresh = [name for name, converted in in_place.items() if not converted]
    quantize = {meta["layers"][name]["quantize"] for name in fresh}
    double_quant = {meta["layers"][name]["double_quant"] for name in fresh}
    if len(quantize) > 1 or len(double_quant) > 1:
        raise ValueError("load_fura_adapter: the adapter mixes quantised and plain layers (or NF4 formats)")
    originals = {name: model.get_submodule(name) for name in (*fresh, *uncovered)}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    snapshots = {
        name: {t: p.detach().clone() for t, p in model.get_submodule(name).named_parameters() if p.requires_grad}
        for name, converted in in_place.items()
        if converted
    }
    if fresh:
        convert_to_fura(model, fresh, config, quantize=quantize.pop(), double_quant=double_quant.pop() is not False,
                        progress=progress)  # fmt: skip
    try:
        for name in fresh:
            entry, layer = meta["layers"][name], model.get_submodule(name)
            if entry.get("initial"):
                _rebuild_frozen_core(layer, originals[name], entry, {t: tensors[f"{name}.initial.{t}"]
                                                                     for t in entry["initial"]})  # fmt: skip
            else:
                _check_probe(name, layer, entry, meta["format_version"])
        bases = {name: layer.base_linear().requires_grad_(False) for name, layer in uncovered.items()}
        with torch.no_grad():
            for name, entry in meta["layers"].items():
                params = dict(model.get_submodule(name).named_parameters())
                for t_name in entry["tensors"]:
                    params[t_name].copy_(tensors[f"{name}.{t_name}"])
        for names in module_names(model).values():
            if names[0] in bases:
                for alias in names:
                    parent, attr = split_name(model, alias)
                    setattr(parent, attr, bases[names[0]])
    except BaseException:
        with torch.no_grad():
            for name, saved in snapshots.items():
                params = dict(model.get_submodule(name).named_parameters())
                for t_name, value in saved.items():
                    params[t_name].copy_(value)
        for names in module_names(model).values():
            if names[0] in originals:
                for alias in names:
                    parent, attr = split_name(model, alias)
                    setattr(parent, attr, originals[names[0]])
        for p in model.parameters():
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        raise
    return model


def merged_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict (or `state_dict`, its full state dict) with every FuRA layer replaced
    by its merged `weight` (and `bias`) under each of its names, in the base's dtype."""
    layers = _fura_layers(model)
    source = model.state_dict() if state_dict is None else state_dict
    owners = {alias for name, (_, aliases) in layers.items() for alias in (name, *aliases)}

    def owned(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in owners for i in range(1, len(parts)))

    state = {key: value for key, value in source.items() if not owned(key)}
    with torch.no_grad():
        for name, (layer, aliases) in layers.items():
            local = None if state_dict is None else _layer_state(name, layer, state_dict)
            merged = layer.to_linear(local)
            for alias in (name, *aliases):
                state[f"{alias}.weight"] = merged.weight.detach()
                if merged.bias is not None:
                    state[f"{alias}.bias"] = merged.bias.detach()
    return state


def merged_named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs of the model as its base checkpoint names them, for pushing weights
    to an inference engine (vLLM's `load_weights`, say) during RL training.

    Plain parameters and buffers pass through under their own names, as references (no copy).
    Each FuRA layer is merged on its own, when the iteration reaches it, and yielded as
    `<name>.weight` (and `<name>.bias`) under every name it has: the extra memory at any moment
    is about one layer's merged weight, never a dense copy of the model. Consume the pairs as
    they come (an engine copies each into its own storage)."""
    layers = _fura_layers(model)
    owners = {alias for name, (_, aliases) in layers.items() for alias in (name, *aliases)}

    def owned(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in owners for i in range(1, len(parts)))

    for key, value in model.state_dict(keep_vars=True).items():
        if not owned(key):
            yield key, value.detach()
    for name, (layer, aliases) in layers.items():
        with torch.no_grad():
            merged = layer.to_linear()
        for alias in (name, *aliases):
            yield f"{alias}.weight", merged.weight.detach()
            if merged.bias is not None:
                yield f"{alias}.bias", merged.bias.detach()
        del merged


def save_merged(model: nn.Module, directory: str | Path, **save_pretrained_kwargs: Any) -> Path:
    """Save a Hugging Face model with its FuRA layers merged, as `save_pretrained` would save the
    base: it reloads with `AutoModelForCausalLM.from_pretrained` and gives the same outputs. No
    adapter is written (`save_pretrained` of a converted model writes both), and one left in the
    folder by an earlier save is removed: it belongs to other weights. The in-memory model is not
    changed."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_merged: {type(model).__name__} has no save_pretrained (a transformers model is needed)")
    directory = Path(directory)
    state_dict = save_pretrained_kwargs.pop("state_dict", None)
    if save_pretrained_kwargs.get("is_main_process", True):
        _remove_adapter(directory / ADAPTER_SUBDIR)
    type(model).save_pretrained(model, directory, state_dict=merged_state_dict(model, state_dict),
                                **save_pretrained_kwargs)  # fmt: skip
    return directory


def _remove_adapter(directory: Path) -> None:
    """Delete an adapter folder's two files and the folder (left in place if it holds anything else)."""
    if not directory.is_dir():
        return
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass


# save_pretrained arguments that only concern the upload to the Hub.
_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags")


def fura_save_pretrained(self: nn.Module, save_directory, *args: Any, **kwargs: Any) -> None:
    """`save_pretrained` of a model converted by `convert_to_fura` (installed on the instance).

    Writes what the base architecture can load: the merged dense weights under the base's own
    names and dtypes, so `AutoModelForCausalLM.from_pretrained(save_directory)` gives the trained
    model; and the FuRA adapter in `save_directory/fura_adapter`, from which training resumes
    (`load_fura_adapter`), tied to those weights by their fingerprints. A `state_dict` passed in
    (HF Trainer does so under FSDP and DeepSpeed) is merged the same way. With no FuRA layer left
    (after `merge_fura`), it is the class's own `save_pretrained`. Either way an adapter already in
    the folder is removed before anything is written (it belongs to the weights being replaced),
    and `push_to_hub=True` uploads only once both are written."""
    base_save = type(self).save_pretrained
    push_to_hub = kwargs.pop("push_to_hub", False)
    hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
    is_main = kwargs.get("is_main_process", True)
    adapter_directory = Path(save_directory) / ADAPTER_SUBDIR
    if is_main:
        _remove_adapter(adapter_directory)
    layers = _fura_layers(self)
    if not layers:
        base_save(self, save_directory, *args, **kwargs)
    else:
        state_dict = kwargs.pop("state_dict", None)
        merged = merged_state_dict(self, state_dict)
        # Before the save: transformers edits the state dict it is given (tied keys, say).
        fingerprints = {name: weight_fingerprint(merged[f"{name}.weight"]) for name in layers}
        base_save(self, save_directory, *args, state_dict=merged, **kwargs)
        if is_main:
            save_fura_adapter(self, adapter_directory, state_dict=state_dict, merged_fingerprints=fingerprints)
            # What the load hook below looks in when it is handed these merged weights again.
            self._fura_saved_adapters = [*getattr(self, "_fura_saved_adapters", []), adapter_directory.resolve()]
    if push_to_hub and is_main:
        # PushToHubMixin.push_to_hub saves through this method into a fresh folder, then uploads.
        repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
        self.push_to_hub(repo_id, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_kwargs)


def load_adapter_saved_with_weights(model: nn.Module, state_dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of a converted model (`convert_to_fura` registers it).

    A checkpoint written by `save_pretrained` holds merged weights, which the FuRA layers accept
    only once the adapter saved with them is loaded. HF Trainer loads such a checkpoint itself
    with `load_best_model_at_end=True`: if the merged weights handed in are those of an adapter
    this model saved, that adapter is loaded first (all of its checks apply), then the load
    goes on. Weights this model did not save are left to the layers' own check, which raises."""
    saved = getattr(model, "_fura_saved_adapters", None)
    if not saved:
        return
    for name in _fura_layers(model):
        key = f"{prefix}{name}.weight"
        if key in state_dict and f"{prefix}{name}.btt_r" not in state_dict:
            break
    else:
        return
    fingerprint = weight_fingerprint(state_dict[key])
    for directory in reversed(saved):
        try:
            entry = json.loads((directory / ADAPTER_CONFIG).read_text())["layers"][name]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a checkpoint rotated away, or not ours
        if entry.get("merged_fingerprint") == fingerprint:
            load_fura_adapter(model, directory, progress=False)
            return
