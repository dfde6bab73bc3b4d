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
from torch import nn
from tqdm.auto import tqdm

from .config import PREFIX, FuRAPeftConfig
from .layer import FuRALinear, fingerprint_hex, supports_base_layer


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
        """PEFT's per-request adapters (`model(..., adapter_names=[...])`, also through `generate`):
        not implemented for FuRA yet, so refused rather than silently running the active adapter."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "FuRA: mixed-adapter batches (adapter_names=...) are not supported yet; use set_adapter(name) and run "
                "each adapter's requests as their own batch"
            )
        yield

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
