"""`FuRAModel`: the PEFT tuner that puts `FuRALinear`s into a model.

PEFT's `BaseTuner` does the rest (target matching, `modules_to_save`, merge and unload, adapter
switching, state dicts). What is FuRA's own: layers are decomposed one at a time on their own
device with a progress bar, and a saved adapter is refused, before anything is loaded, when its
base fingerprint does not match the layer it would go into; the model is then unwrapped again.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from tqdm.auto import tqdm

from .config import PREFIX, FuRAPeftConfig
from .layer import FuRALinear, fingerprint_hex, supports_base_layer
from .mixed import BASE_ADAPTER, MixedBatch


class FuRAModel(BaseTuner):
    """FuRA adapters (transform form) on a model; built by `peft.get_peft_model` from a `FuRAPeftConfig`."""

    prefix: str = PREFIX
    tuner_layer_cls = FuRALinear
    # The same defaults as LoRA (q and v projections), for a config without target_modules.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        decomposing = not getattr(config, "_awaiting_saved_tensors", False)
        show = decomposing and getattr(config, "progress_bar", True)
        self._progress = tqdm(desc=f"FuRA: decomposing layers for {adapter_name!r}", unit="layer", disable=not show)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            _roll_back_adapter(model, adapter_name, keep_config=True)  # the model as it was
            raise
        finally:
            self._progress.close()

    def _create_and_replace(
        self,
        peft_config: FuRAPeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        *,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise NotImplementedError(f"FuRA adapts layers, not parameters; got target_parameters for {current_key!r}")
        if isinstance(target, FuRALinear):
            target.update_layer(adapter_name, peft_config)
        else:
            if not supports_base_layer(target):
                raise TypeError(
                    f"FuRA: target module {current_key!r} is a {type(target).__name__}; the transform form wraps "
                    "nn.Linear, bitsandbytes Linear4bit/Linear8bitLt and transformers' Conv1D"
                )
            model_config = getattr(self.model, "config", None)
            new_module = FuRALinear(
                target, adapter_name, peft_config, module_name=current_key, model_config=model_config
            )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        progress = getattr(self, "_progress", None)
        if progress is not None:
            progress.update(1)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """PEFT's mixed-adapter batches: `model(..., adapter_names=[...])` and `generate(...,
        adapter_names=[...])` run sequence `i` with adapter `adapter_names[i]` (`"__base__"`: the
        base model). Every FuRA layer gets one `MixedBatch` for the call (routing built once per
        sequence length, shared by all layers) and refreshes its cached maps once, here; PEFT's
        `modules_to_save` wrappers get the names, as for LoRA. Beam search and
        `num_return_sequences` repeat each name as `generate` repeats each input."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("FuRA: adapter_names= runs a mixed-adapter batch for inference; call model.eval() first")
        if not isinstance(adapter_names, list | tuple) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(
                f"FuRA: adapter_names must be a list of adapter names, one per sequence; got {adapter_names!r}"
            )
        layers = [module for module in self.model.modules() if isinstance(module, FuRALinear)]
        adapters = tuple(sorted({name for layer in layers for name in layer.fura_R}))
        unknown = sorted({name for name in adapter_names if name != BASE_ADAPTER} - set(adapters))
        if unknown:
            raise ValueError(
                f"FuRA: adapter_names names adapter(s) {unknown} that this model does not have; its FuRA adapters are "
                f"{list(adapters)} (and {BASE_ADAPTER!r} for the base model)"
            )
        expand = _generation_expansion(kwargs)
        expanded = [name for name in adapter_names for _ in range(expand)]
        mixed = MixedBatch(expanded, adapters)
        for layer in layers:
            layer.refresh_serving_maps()
        handles = []
        try:
            handles += _inject(self.model, FuRALinear, fura_mixed_batch=mixed)
            handles += _inject(self.model, AuxiliaryTrainingWrapper, adapter_names=expanded)
            encoder = _encoder(self.model)
            if expand > 1 and encoder is not None:  # the encoder runs on the inputs before generate repeats them
                handles += _inject(encoder, FuRALinear, fura_mixed_batch=MixedBatch(list(adapter_names), adapters))
                handles += _inject(encoder, AuxiliaryTrainingWrapper, adapter_names=list(adapter_names))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put `new_module` in place. BaseTuner's version copies `weight` onto anything without a
        `base_layer`, which breaks unloading a `modules_to_save` module that has none (LLaVA's
        projector); a FuRA layer is built on its base layer's device, so nothing else is needed
        but bitsandbytes 8-bit state."""
        setattr(parent, child_name, new_module)
        base = getattr(child, "base_layer", child)
        if getattr(base, "state", None) is not None and hasattr(new_module, "base_layer"):
            new_module.base_layer.state = base.state

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: FuRAPeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problem = _base_mismatch(model, adapter_name, remapped)
        if problem is not None:
            _roll_back_adapter(model, adapter_name)
            raise ValueError(problem)
        return remapped


def serve_from_maps(
    model: nn.Module, adapter_names: list[str] | None = None, device: str | torch.device = "cpu"
) -> int:
    """Serve FuRA adapters from their cached maps alone: on every FuRA layer, keep each named
    adapter's map (`in * b` values, in a half-precision base's dtype) on the base's device and
    move its `R`, `S`, `V0`, `S0` and bias update to `device` (host memory by default), frozen.

    Forward passes, mixed batches included, then read the maps; `save_pretrained`, merging and
    `get_delta_weight` read the moved tensors (the same values), so nothing is lost;
    `model.to(...)` brings the tensors back. An adapter served this way cannot train (its layers
    refuse in training mode). `adapter_names=None`: every adapter. Returns the bytes moved off
    the base's device."""
    layers = [module for module in model.modules() if isinstance(module, FuRALinear)]
    known = {name for layer in layers for name in layer.fura_R}
    names = sorted(known) if adapter_names is None else list(adapter_names)
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"serve_from_maps: no FuRA adapter(s) {unknown} in this model; it has {sorted(known)}")
    for layer in layers:  # every map first, so that a failure moves nothing
        layer.refresh_serving_maps()
    return sum(layer.serve_from_map(name, device) for layer in layers for name in names)


def _base_mismatch(model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> str | None:
    """Why a saved adapter does not belong on this model's base layers, or None.

    Checked for every layer before any tensor is copied: its saved fingerprint against the one of
    the base weight it would go into (by value, so a bf16 and an fp32 copy of one checkpoint
    match; a fine-tuned checkpoint, or a quantised base against its original, do not), and the
    presence of its tensors."""
    for name, module in model.named_modules():
        if not isinstance(module, FuRALinear) or adapter_name not in module.fura_R:
            continue
        key = f"{name}.fura_fingerprint.{adapter_name}"
        if key not in state:
            if f"{name}.fura_R.{adapter_name}" in state:
                return f"FuRA adapter {adapter_name!r}: layer {name!r} has no base fingerprint in the saved adapter"
            continue  # PEFT reports missing keys itself
        saved = fingerprint_hex(state[key])
        ours = module.base_fingerprint()
        if saved is not None and saved != ours:
            return (
                f"FuRA adapter {adapter_name!r} was trained on another base: layer {name!r} has base fingerprint "
                f"{ours[:16]}… but the adapter expects {saved[:16]}… (different weight values: another checkpoint, "
                "a fine-tuned one, or a quantised base against its unquantised original). Load it onto the base it "
                "was trained on; nothing was loaded"
            )
    return None


def _roll_back_adapter(model: nn.Module, adapter_name: str, keep_config: bool = False) -> None:
    """Remove a half-injected adapter: its entries in every layer, its config, and the FuRA
    wrappers left with no adapter at all (their base layers go back in place)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, FuRALinear) or adapter_name not in module.fura_R:
            continue
        module.delete_adapter(adapter_name)
        if not module.fura_R:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and not keep_config:
        peft_config.pop(adapter_name, None)


def _generation_expansion(kwargs: dict[str, Any]) -> int:
    """How many rows `generate` makes of each input: `max(num_beams, num_return_sequences)`, read
    from the call's arguments or its `generation_config` (a model's default config that asks for
    more is not read; its rows then fail the layers' batch check by name, never run misrouted)."""
    config = kwargs.get("generation_config")

    def setting(name: str) -> int:
        value = kwargs.get(name, getattr(config, name, None))
        return int(value) if value else 1

    return max(setting("num_beams"), setting("num_return_sequences"))


def _inject(root: nn.Module, kind: type, **values: Any) -> list:
    """Forward pre-hooks that pass `values` as keyword arguments to every `kind` module under `root`."""

    def hook(module, args, kwargs):
        kwargs.update(values)
        return args, kwargs

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in root.modules() if isinstance(m, kind)]


def _encoder(model: nn.Module) -> nn.Module | None:
    """An encoder-decoder model's encoder (transformers 5 returns the model itself when there is none)."""
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return None if encoder is None or encoder is model else encoder
