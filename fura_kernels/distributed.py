"""Multi-GPU helpers: FSDP2 wrapping, meta-device initialisation, gathering for save.

FuRA layers need nothing special under DDP (every trainable tensor gets a gradient every step,
so `find_unused_parameters` stays off). Under FSDP2 (`torch.distributed.fsdp.fully_shard`):

    model = ...  # built on the meta device, converted with convert_to_fura (shapes only)
    shard_fura_model(model)                          # each decoder layer its own unit, then the root
    materialize_from_meta(model, "cuda", full_state_dict_on_rank0)
    ...train...
    save_fura_adapter(model, "adapter/")             # every rank calls; rank 0 writes full tensors

The fused Function runs inside each layer's own `forward`, where FSDP2 has unsharded the
parameters, so the kernels see plain tensors. Frozen and trainable tensors are separate
parameters (L, R, S, bias), so wrap policies and optimisers can tell them apart.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly FSDP2-sharded) parameter; a collective for DTensors,
    so every rank must call it."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (`model.model.layers` and the like)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers", "encoder.layer"):
        try:
            return list(model.get_submodule(path))
        except AttributeError:
            continue
    raise ValueError(f"decoder_layers: cannot find the repeated layers of {type(model).__name__}; pass them in")


def shard_fura_model(model: nn.Module, layers: Iterable[nn.Module] | None = None, mesh=None, **kwargs) -> nn.Module:
    """`fully_shard` each decoder layer (a unit each), then the root module, in place."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers if layers is not None else decoder_layers(model):
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def reset_rotary_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute rotary-embedding frequencies (non-persistent buffers: no state dict has them,
    so `to_empty` leaves them as garbage) for transformers models."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config") and hasattr(module, "rope_type"):
            init = getattr(module, "compute_default_rope_parameters", None)
            if module.rope_type != "default" or init is None:  # transformers < 5 keeps "default" in the table
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                init = ROPE_INIT_FUNCTIONS[module.rope_type]
            try:  # transformers 5 takes the config alone; 4.x also takes the device
                inv_freq, module.attention_scaling = init(module.config)
            except TypeError:
                inv_freq, module.attention_scaling = init(module.config, device)
            module.inv_freq = inv_freq.to(device)
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = inv_freq.clone().to(device)


def materialize_from_meta(
    model: nn.Module, device: torch.device | str, full_state_dict: dict[str, torch.Tensor] | None
) -> nn.Module:
    """Allocate a meta-built (and possibly sharded) model on `device` and fill it from a full
    state dict that only rank 0 needs to hold (`None` elsewhere): broadcast, then sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=True)
    set_model_state_dict(model, full_state_dict if full_state_dict is not None else {}, options=options)
    reset_rotary_buffers(model, device)
    return model
