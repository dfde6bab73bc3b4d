"""What the recipes share: saving a trained model the way its method calls for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..adapters import save_fura_adapter, save_merged


def save_outputs(model, processor, method: str, output_dir: str | Path, merge: bool,
                 adapter_extra: Callable[[Path], object] | None = None) -> dict[str, str]:  # fmt: skip
    """Save `model` (unwrapped, on the main process) as its method calls for; returns the paths.

    - FuRA / QFuRA: the adapter (`save_fura_adapter`), then `adapter_extra(adapter_dir)` (say, a
      VLM's projector); with `merge`, the merged model as the base architecture saves it;
    - LoRA / QLoRA: PEFT's adapter; with `merge`, PEFT's merged model;
    - full fine-tuning: the model.

    The processor (tokenizer) is saved beside every full model (merged or fine-tuned)."""
    out = Path(output_dir)
    paths: dict[str, str] = {}
    if method in ("fura", "qfura"):
        paths["adapter"] = str(save_fura_adapter(model, out / "adapter"))
        if adapter_extra is not None:
            adapter_extra(out / "adapter")
        if merge:
            paths["merged"] = str(save_merged(model, out / "merged"))
    elif method in ("lora", "qlora"):
        model.save_pretrained(out / "adapter")
        paths["adapter"] = str(out / "adapter")
        if merge:
            model.merge_and_unload().save_pretrained(out / "merged")
            paths["merged"] = str(out / "merged")
    else:
        model.save_pretrained(out / "model")
        paths["model"] = str(out / "model")
    for key in ("merged", "model"):
        if key in paths:
            processor.save_pretrained(paths[key])
    return paths
