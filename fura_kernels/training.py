"""Training-loop helpers: the reference's core normalisation after each optimiser step.

The reference's SFT and RL scripts (`--blocktt_normalize_after_update`, also several RL
ablations) call `normalize_trainable_blocktt_cores_(model)` after every `optimizer.step()`: each
trainable core is rescaled so that every vector over its block dimension has unit norm, the R
core's `(n, m, r)` vectors over `b` and the L core's `(m, n, r)` vectors over `a`. With a separate
`S` (the default) this keeps each singular direction on the unit sphere and leaves its scale to
`S`.

Three ways in: `normalize_trainable_cores_(model)` (call it after `optimizer.step()`),
`normalize_cores_after_step(optimizer, model)` (an optimiser step post-hook: any loop, accelerate's
included, since accelerate steps the wrapped optimiser only on a real update), and
`NormalizeCoresCallback` (a transformers `TrainerCallback`: HF Trainer, TRL). Each touches only the
trained cores, in place, nothing weight-sized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer import FusedBTTLinear


def _normalize_(core: torch.Tensor, dim: int, eps: float) -> None:
    """`core /= ||core||` along `dim`, the norm taken in fp32 at least (a bf16 core's norm in bf16
    would round before the division)."""
    norms = torch.linalg.vector_norm(core, dim=dim, keepdim=True, dtype=torch.promote_types(core.dtype, torch.float32))
    core.div_(norms.clamp_min(eps))  # in place, rounded once into the core's dtype


def _peft_fura_layer_type() -> type | None:
    try:
        from .peft.layer import FuRALinear
    except ImportError:  # PEFT is not installed: there are no PEFT-form layers to normalise
        return None
    return FuRALinear


@torch.no_grad()
def normalize_trainable_cores_(model: nn.Module, eps: float = 1e-12) -> dict[str, int]:
    """Rescale every trainable FuRA core of `model` to unit-norm vectors over its block dimension,
    in place: `FusedBTTLinear` / QFuRA (`btt_r` over `b`, a trainable `btt_l` over `a`) and the PEFT
    form's R of every adapter (over `b`). Frozen cores are left alone. Returns how many cores of
    each side it normalised, as the reference does."""
    counts = {"normalized_left_cores": 0, "normalized_right_cores": 0}
    peft_layer = _peft_fura_layer_type()
    for module in model.modules():
        if isinstance(module, FusedBTTLinear):
            if module.btt_r.requires_grad:
                _normalize_(module.btt_r, 1, eps)  # (n, b, m*r): each (n, m, r) vector over b
                counts["normalized_right_cores"] += 1
            left = module.btt_l
            if left is not None and left.requires_grad:
                _normalize_(left, 2, eps)  # (m, n*r, a): each (m, n, r) vector over a
                counts["normalized_left_cores"] += 1
        elif peft_layer is not None and isinstance(module, peft_layer):
            for core in module.fura_R.values():
                if core.requires_grad:
                    _normalize_(core, 1, eps)  # (n, b, r), the m = 1 layout of btt_r
                    counts["normalized_right_cores"] += 1
    return counts


def normalize_cores_after_step(optimizer: torch.optim.Optimizer, model: nn.Module, eps: float = 1e-12) -> Any:
    """Normalise `model`'s trainable cores after every step of `optimizer`; returns the hook's
    handle (`handle.remove()` stops it). Register it on the optimiser you built, before wrapping
    it (accelerate, DeepSpeed): the wrapper steps it only on real updates."""
    return optimizer.register_step_post_hook(lambda *_: normalize_trainable_cores_(model, eps))


def normalize_callback() -> Any:
    """A `transformers.TrainerCallback` that normalises the model's trainable cores after every
    optimiser step (`on_optimizer_step`), for HF Trainer and TRL trainers: `callbacks=[...]`."""
    from transformers import TrainerCallback

    class NormalizeCoresCallback(TrainerCallback):
        """After each optimiser step, `normalize_trainable_cores_(model)` (the reference's
        `--blocktt_normalize_after_update`)."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if model is not None:
                normalize_trainable_cores_(model)

    return NormalizeCoresCallback()
