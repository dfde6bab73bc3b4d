"""`QFusedBTTLinear`: FuRA with the frozen L core in 4-bit NF4 (QFuRA), as QLoRA stores W."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import FuRAConfig
from .cores import QUANT_TYPES
from .layer import FusedBTTLinear
from .nf4 import NF4Tensor


class QFusedBTTLinear(FusedBTTLinear):
    """A `FusedBTTLinear` that holds its frozen L core as an `NF4Core` (bitsandbytes' format).

    The core stores `Lt = L[0]^T` (out x n*r) in about 0.516 bytes a value, against 2 for bf16
    (see `fura_kernels.cores`). R, S and the bias are as in `FusedBTTLinear` (trainable,
    `trainable_dtype`); `btt_l` is None.

    QFuRA needs the default layout with a frozen L: `decomp_mode="output_one_block"` and a
    layer where `train_position="small"` picks R (out_features > the input block size b).

    `nf4_relative_error` is the quantisation's relative Frobenius error on `Lt` (NaN for a layer
    not built by quantising): merging with `to_linear()` reproduces this layer's own outputs,
    which differ from the original dense layer's by that error.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: FuRAConfig | None = None,
        *,
        double_quant: bool = True,
        module_name: str | None = None,
        model_config: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            config,
            module_name=module_name,
            model_config=model_config,
            device=device,
            dtype=dtype,
            quant_type=quant_type,
            double_quant=double_quant,
        )
        # A buffer, not an attribute, so that it travels with state dicts: a QFuRA model rebuilt
        # from one reports its quantisation error too.
        self.register_buffer("nf4_error", torch.full((), float("nan"), dtype=torch.float32, device=device))
        self._register_load_state_dict_pre_hook(_state_dicts_from_before_nf4_error, with_module=True)

    @property
    def nf4_relative_error(self) -> float:
        return float("nan") if self.nf4_error.device.type == "meta" else float(self.nf4_error.item())

    @nf4_relative_error.setter
    def nf4_relative_error(self, value: float) -> None:
        with torch.no_grad():
            self.nf4_error.fill_(value)

    @property
    def double_quant(self) -> bool:
        return self.l_core.double_quant

    @property
    def nf4_shape(self) -> tuple[int, int]:
        return self.l_core.shape

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: FuRAConfig | None = None,
        *,
        double_quant: bool = True,
        quant_type: str = "nf4",
        module_name: str | None = None,
        model_config: Any = None,
        **overrides: Any,
    ) -> QFusedBTTLinear:
        """Factorise `linear` (as `FusedBTTLinear.from_linear`) and quantise its frozen core."""
        _check_quant_type(quant_type, module_name)
        fura = FusedBTTLinear.from_linear(
            linear, config, module_name=module_name, model_config=model_config, **overrides
        )
        return cls.from_fura(fura, double_quant=double_quant, model_config=model_config)

    @classmethod
    def from_fura(
        cls, layer: FusedBTTLinear, *, double_quant: bool = True, quant_type: str = "nf4", model_config: Any = None
    ) -> QFusedBTTLinear:
        """Quantise the frozen L core of a `FusedBTTLinear` (its R, S and bias are copied)."""
        _check_quant_type(quant_type, layer.module_name)
        if layer.btt_l is None:
            raise TypeError(f"{layer._where}: already quantised")
        device = layer.btt_r.device
        qlayer = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            config=layer.config,
            double_quant=double_quant,
            module_name=layer.module_name,
            model_config=model_config,
            device=device,
            dtype=layer.btt_l.dtype,
        )
        if qlayer.block_shape != layer.block_shape:
            raise ValueError(f"{layer._where}: block shape changed on requantisation ({layer.block_shape})")
        if device.type == "meta":
            return qlayer
        qlayer.nf4_relative_error = qlayer.l_core.quantize_from(layer.btt_l.detach()[0].t())
        with torch.no_grad():
            qlayer.btt_r.copy_(layer.btt_r)
            if layer.btt_s is not None:
                qlayer.btt_s.copy_(layer.btt_s)
            if layer.bias is not None:
                qlayer.bias.copy_(layer.bias)
        qlayer.base_fingerprint, qlayer.degenerate_blocks = layer.base_fingerprint, layer.degenerate_blocks
        if getattr(layer, "initial_trainables", None) is not None:
            qlayer.initial_trainables = dict(layer.initial_trainables)
        return qlayer

    def nf4_state(self) -> NF4Tensor:
        """The NF4 core as an `NF4Tensor` (views of the core's buffers, no copy)."""
        return self.l_core.state()

    def nf4_bytes(self) -> int:
        """Bytes the frozen core occupies (codes, absmax, nested statistics)."""
        return self.l_core.storage_bytes()

    def dequantized_l(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`btt_l` (1, n*r, out) rebuilt from NF4, in `dtype` (the core's dtype by default)."""
        return self.l_core.materialize(dtype or self.l_core.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4_bytes={self.nf4_bytes():,}, rel_error={self.nf4_relative_error:.2e}"


def _check_quant_type(quant_type: str, module_name: str | None) -> None:
    if quant_type not in QUANT_TYPES:
        where = f" for {module_name!r}" if module_name else ""
        raise ValueError(
            f"QFusedBTTLinear{where}: quant_type={quant_type!r} is not supported; expected one of {QUANT_TYPES}"
        )


def _state_dicts_from_before_nf4_error(layer: QFusedBTTLinear, state_dict, prefix, *args) -> None:
    """State dicts written before `nf4_error` was a buffer load with the error unknown (NaN)."""
    state_dict.setdefault(prefix + "nf4_error", torch.full((), float("nan")))
