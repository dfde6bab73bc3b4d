"""Between the two forms of one FuRA fine-tune: `FusedBTTLinear` (the L form, from
`convert_to_fura`) and the PEFT transform form (`FuRALinear`). Same trained `R` and `S`, same
function (FURA_SPEC.md §11):

- L form -> PEFT: the base weight is the layer's merge at its decomposition-time values,
  `W0 = L · diag(S0) · R0`; `V0 = R0` (as `Vh`), `S0`; the trained `R`, `S` are copied.
- PEFT -> L form: `L_j = W[:, j] · V0_j^T · diag(1 / S0_j)` (float64), the trained `R`, `S` copied,
  and the decomposition-time values kept so that the base can be rebuilt (`base_linear`).

No SVD runs either way.
"""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..layer import FusedBTTLinear
from ..model import attach_model_methods, module_names, split_name
from .config import FuRAPeftConfig
from .layer import FuRALinear, _fingerprint_bytes, fingerprint_hex


def _transform_form_problem(name: str, layer: FusedBTTLinear) -> str | None:
    roles, shape = layer.roles, layer.block_shape
    if layer.btt_l is None:
        return f"{name!r} stores L in NF4 (QFuRA); the PEFT form keeps the base weight W instead of L"
    if shape.m != 1:
        return f"{name!r} has {shape.m} output blocks (decomp_mode={layer.config.decomp_mode_for(layer.module_name)!r})"
    if roles.train_l or not roles.train_r:
        return f"{name!r} trains L (train_position={layer.config.train_position!r})"
    if layer.config.s_merged_to != "keep_trainable":
        return f"{name!r} has s_merged_to={layer.config.s_merged_to!r}, not 'keep_trainable'"
    if layer.config.init != "svd":
        return f"{name!r} was decomposed with init={layer.config.init!r}, not 'svd'"
    if getattr(layer, "initial_trainables", None) is None:
        return f"{name!r} does not know its decomposition-time values (built from a state dict, not from_linear)"
    return None


@torch.no_grad()
def fura_to_peft(model: nn.Module, adapter_name: str = "default", task_type: str | None = None) -> PeftModel:
    """A model converted with `convert_to_fura` (trained or not) as a PEFT model with one FuRA
    adapter in the transform form, computing the same function; `model` is changed in place
    (its FuRA layers become their base `nn.Linear`s, wrapped by PEFT). Every layer is checked
    first: a layer the transform form cannot hold raises and leaves the model as it was."""
    names = module_names(model)
    modules = dict(model.named_modules())
    layers = {ns[0]: modules[ns[0]] for ns in names.values() if isinstance(modules.get(ns[0]), FusedBTTLinear)}
    if not layers:
        raise ValueError("fura_to_peft: the model has no FusedBTTLinear layer (convert it with convert_to_fura first)")
    problems = [p for name, layer in layers.items() if (p := _transform_form_problem(name, layer))]
    configs = {layer.config for layer in layers.values()}
    if problems:
        raise ValueError("fura_to_peft: the transform form cannot hold " + "; ".join(problems))
    if len(configs) > 1:
        raise ValueError(f"fura_to_peft: the layers were converted with {len(configs)} different FuRAConfigs")
    shared = [ns for ns in names.values() if len(ns) > 1 and ns[0] in layers]
    if shared:
        raise ValueError(f"fura_to_peft: layer {shared[0][0]!r} is shared under several names {shared[0]}")
    bases = {name: layer.base_linear() for name, layer in layers.items()}
    for name, base in bases.items():
        parent, attr = split_name(model, name)
        setattr(parent, attr, base)
    config = FuRAPeftConfig.from_fura_config(
        next(iter(configs)), target_modules=sorted(layers), task_type=task_type, progress_bar=False
    )
    config._awaiting_saved_tensors = True  # the tensors come from the layers below, not from an SVD
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        inner = peft_model.base_model.model
        for name, layer in layers.items():
            _fill_from_fused(inner.get_submodule(name), adapter_name, name, layer)
    except Exception:
        for name, layer in layers.items():  # put the FuRA layers back where they were
            parent, attr = split_name(model, name)
            setattr(parent, attr, layer)
        if hasattr(model, "peft_config"):
            del model.peft_config
        raise
    config._awaiting_saved_tensors = False
    return peft_model


def _fill_from_fused(target: FuRALinear, adapter: str, name: str, layer: FusedBTTLinear) -> None:
    if target.block_shapes[adapter] != layer.block_shape:
        raise ValueError(
            f"fura_to_peft: {name!r} resolves to blocks {target.block_shapes[adapter]} in the PEFT form but "
            f"{layer.block_shape} in the L form"
        )
    initial = layer.initial_trainables
    n, r = layer.block_shape.n, layer.block_shape.r
    device = target.fura_R[adapter].device
    target.fura_R[adapter].copy_(layer.btt_r.float())
    target.fura_S[adapter].copy_(layer.btt_s.reshape(n, r).float())
    target.fura_V0[adapter].copy_(initial["btt_r"].to(device).float().transpose(1, 2))
    target.fura_S0[adapter].copy_(initial["btt_s"].to(device).reshape(n, r).float())
    if adapter in target.fura_bias:
        start = initial.get("bias")
        if start is None:  # the bias did not train: no update
            target.fura_bias[adapter].zero_()
        else:
            target.fura_bias[adapter].copy_(layer.bias.float() - start.to(device).float())
    target.fura_fingerprint[adapter].copy_(_fingerprint_bytes(layer.base_fingerprint or target.base_fingerprint()))
    target.awaiting_saved_tensors.discard(adapter)


@torch.no_grad()
def peft_to_fura(peft_model: PeftModel, adapter_name: str | None = None) -> nn.Module:
    """The base model of a PEFT model with a FuRA adapter, its FuRA layers as `FusedBTTLinear`
    (the L form) computing the same function. Base layers must be plain `nn.Linear`s (the L form
    of a quantised base is QFuRA, which quantises L, not W). All layers are built before any
    replaces its wrapper, so an error leaves the PEFT model as it was."""
    adapter_name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config.get(adapter_name)
    if not isinstance(config, FuRAPeftConfig):
        raise ValueError(f"peft_to_fura: adapter {adapter_name!r} is not a FuRA adapter ({type(config).__name__})")
    fura_config = config.fura_config()
    inner = peft_model.base_model.model
    built: dict[str, FusedBTTLinear] = {}
    for name, module in inner.named_modules():
        if not isinstance(module, FuRALinear) or adapter_name not in module.fura_R:
            continue
        if module.merged:
            raise ValueError(f"peft_to_fura: {name!r} has merged adapters {module.merged_adapters}; unmerge first")
        base = module.get_base_layer()
        if type(base) is not nn.Linear:
            raise ValueError(
                f"peft_to_fura: {name!r} wraps a {type(base).__name__}; the L form (FusedBTTLinear) is built from a "
                "plain nn.Linear base"
            )
        module._check_loaded(adapter_name)
        built[name] = _fused_from_layer(module, adapter_name, name, fura_config, getattr(inner, "config", None))
    if not built:
        raise ValueError(f"peft_to_fura: no layer holds FuRA adapter {adapter_name!r}")
    model = peft_model.unload()
    for name, layer in built.items():
        parent, attr = split_name(model, name)
        setattr(parent, attr, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in built.values():
        for pname, p in layer.named_parameters():
            p.requires_grad_(pname in layer.initial_trainables)
    attach_model_methods(model)
    return model


def _fused_from_layer(module: FuRALinear, adapter: str, name: str, fura_config, model_config) -> FusedBTTLinear:
    base = module.get_base_layer()
    weight = base.weight
    layer = FusedBTTLinear(
        module.in_features,
        module.out_features,
        bias=base.bias is not None,
        config=fura_config,
        module_name=name,
        model_config=model_config,
        device=weight.device,
        dtype=weight.dtype,
    )
    shape = module.block_shapes[adapter]
    if layer.block_shape != shape:
        raise ValueError(f"peft_to_fura: {name!r} resolves to blocks {layer.block_shape} but the adapter has {shape}")
    n, b, r, out = shape.n, shape.b, shape.r, module.out_features
    v0 = module.fura_V0[adapter].double()  # (n, r, b)
    s0 = module.fura_S0[adapter].double()  # (n, r)
    u = torch.einsum("ojd,jkd->jok", weight.double().reshape(out, n, b), v0) / s0.unsqueeze(1)  # (n, out, r)
    layer.l_core.btt_l.copy_(u.transpose(1, 2).reshape(1, n * r, out))
    layer.btt_r.copy_(module.fura_R[adapter])
    layer.btt_s.copy_(module.fura_S[adapter].reshape(1, n, r))
    initial = {"btt_r": v0.transpose(1, 2).float().cpu(), "btt_s": s0.reshape(1, n, r).float().cpu()}
    if layer.bias is not None:
        delta = module.fura_bias[adapter] if adapter in module.fura_bias else None
        layer.bias.copy_(base.bias.float() + (delta.float() if delta is not None else 0.0))
        if layer.bias.requires_grad:
            initial["bias"] = base.bias.detach().float().cpu()
    layer.initial_trainables = {k: v for k, v in initial.items() if getattr(layer, k).requires_grad}
    layer.base_fingerprint = fingerprint_hex(module.fura_fingerprint[adapter]) or module.base_fingerprint()
    return layer
