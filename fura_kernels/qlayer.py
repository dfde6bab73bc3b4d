"""`QFusedBTTLinear`: FuRA with the frozen L core in 4-bit NF4 (QFuRA), as QLoRA stores W."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from . import reference
from .autograd import qfura_linear
from .config import FuRAConfig
from .layer import FusedBTTLinear
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from .triton import use_triton
from .triton.nf4_ops import SMALL_T_MAX

QUANT_TYPES = ("nf4",)


def _quantize(core: torch.Tensor, double_quant: bool) -> NF4Tensor:
    """NF4-quantise through bitsandbytes when it is installed (the format's owner), else with
    the pure-PyTorch writer of `fura_kernels.nf4`."""
    try:
        from bitsandbytes import functional as bnb_functional
    except ImportError:
        return quantize_nf4(core, double_quant)
    packed, state = bnb_functional.quantize_4bit(core, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return NF4Tensor.from_bnb(packed, state)


class QFusedBTTLinear(FusedBTTLinear):
    """A `FusedBTTLinear` whose frozen L core is stored as NF4 (bitsandbytes' format).

    Stored: `Lt = btt_l[0]^T` (out x n*r) as buffers `nf4_packed` (uint8, 4 bits a value) and
    `nf4_absmax` (with double quantisation, uint8 plus `nf4_offset`, `nf4_nested_absmax`,
    `nf4_nested_code`): about 0.516 bytes a value, against 2 for bf16. R, S and the bias stay as
    in `FusedBTTLinear` (trainable, `trainable_dtype`). `btt_l` is None.

    QFuRA needs the default layout with a frozen L: `decomp_mode="output_one_block"` and
    `train_position="small"` (or `"large"` when R is the larger core).

    `nf4_relative_error` is the quantisation's relative Frobenius error on `Lt`: merging with
    `to_linear()` reproduces this layer's own outputs, which differ from the original dense
    layer's by that error.
    """

    _dense_l = False

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
        )
        shape, roles = self.block_shape, self.roles
        if shape.m != 1 or roles.train_l:
            raise ValueError(
                f"{self._where}: QFuRA stores a frozen L core in the default layout, but this config gives "
                f"m={shape.m} output blocks and trains {'L' if roles.train_l else 'R'} "
                f"(decomp_mode={self.config.decomp_mode!r}, train_position={self.config.train_position!r}); "
                "use decomp_mode='output_one_block' with train_position='small'"
            )
        # No dense L at all (not even on meta, which `.to()` cannot move): the NF4 buffers hold it.
        del self.btt_l
        self.register_parameter("btt_l", None)
        self.double_quant = double_quant
        self.nf4_shape = (out_features, shape.n * shape.r)
        self.nf4_relative_error = float("nan")
        self._warned_fallback = False
        numel = self.nf4_shape[0] * self.nf4_shape[1]
        blocks = -(-numel // 64)
        self.register_buffer("nf4_packed", torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device))
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("nf4_absmax", torch.empty(blocks, dtype=absmax_dtype, device=device))
        if double_quant:
            self.register_buffer("nf4_offset", torch.empty(1, dtype=torch.float32, device=device))
            self.register_buffer(
                "nf4_nested_absmax", torch.empty(-(-blocks // 256), dtype=torch.float32, device=device)
            )
            self.register_buffer("nf4_nested_code", torch.empty(256, dtype=torch.float32, device=device))

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
        if isinstance(layer, QFusedBTTLinear):
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
        core = layer.btt_l.detach()[0].t().contiguous()
        state = _quantize(core, double_quant)
        with torch.no_grad():
            qlayer._load_state(state)
            qlayer.btt_r.copy_(layer.btt_r)
            if layer.btt_s is not None:
                qlayer.btt_s.copy_(layer.btt_s)
            if layer.bias is not None:
                qlayer.bias.copy_(layer.bias)
            err = (dequantize_nf4(state, torch.float32) - core.float()).norm() / core.float().norm()
        qlayer.nf4_relative_error = err.item()
        qlayer.base_fingerprint, qlayer.degenerate_blocks = layer.base_fingerprint, layer.degenerate_blocks
        return qlayer

    def _load_state(self, state: NF4Tensor) -> None:
        state.validate(self._where)
        if tuple(state.shape) != self.nf4_shape or state.double_quant != self.double_quant:
            raise ValueError(
                f"{self._where}: NF4 state of shape {state.shape} (double_quant={state.double_quant}) does not "
                f"match the layer's core {self.nf4_shape} (double_quant={self.double_quant})"
            )
        for name, tensor in state.tensors().items():
            getattr(self, f"nf4_{name}").copy_(tensor.reshape(getattr(self, f"nf4_{name}").shape))

    def nf4_state(self) -> NF4Tensor:
        """The NF4 core as an `NF4Tensor` (views of this layer's buffers, no copy)."""
        kwargs = {}
        if self.double_quant:
            kwargs = dict(
                offset=self.nf4_offset, nested_absmax=self.nf4_nested_absmax, nested_code=self.nf4_nested_code
            )
        return NF4Tensor(packed=self.nf4_packed, absmax=self.nf4_absmax, shape=self.nf4_shape, dtype=self.base_dtype,
                         **kwargs)  # fmt: skip

    def nf4_bytes(self) -> int:
        """Bytes the frozen core occupies (codes, absmax, nested statistics)."""
        return self.nf4_state().storage_bytes()

    # --- compute ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        state = self.nf4_state()
        tokens = x.numel() // self.in_features
        if tokens <= SMALL_T_MAX and self.nf4_shape[1] % 64 and not self._warned_fallback and use_triton(x):
            self._warned_fallback = True
            warnings.warn(
                f"{self._where}: core rows of {self.nf4_shape[1]} values are not a multiple of 64, so the fused "
                "small-T NF4 kernel cannot run; dequantising the core for every call instead",
                stacklevel=2,
            )
        return qfura_linear(x, state, self.btt_r, self.btt_s, self.bias)

    def dequantized_l(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`btt_l` (1, n*r, out) rebuilt from NF4, in `dtype` (the original dtype by default)."""
        return dequantize_nf4(self.nf4_state(), dtype or self.base_dtype).t().unsqueeze(0)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with: `dequant(L) · diag(S) · R`."""
        dtype = torch.promote_types(self.btt_r.dtype, self.base_dtype)
        s = self.btt_s.to(dtype) if self.btt_s is not None else None
        return reference.dense_weight(self.dequantized_l(dtype), self.btt_r.to(dtype), s)

    def _storage_dtype(self) -> torch.dtype:
        return self.base_dtype

    def _apply(self, fn, recurse=True):
        # `.to(dtype)`, `.half()` and friends must not touch the NF4 buffers (their fp32 absmax
        # would be rounded): take them out, let the module convert the rest, then move them to
        # wherever `fn` sends a tensor, keeping their dtypes.
        nf4 = {name: self._buffers.pop(name) for name in list(self._buffers) if name.startswith("nf4_")}
        try:
            result = super()._apply(fn, recurse)
            self.base_dtype = fn(torch.empty(0, dtype=self.base_dtype)).dtype
        finally:
            if nf4:
                target = fn(torch.empty(0, device=next(iter(nf4.values())).device)).device
                for name, buf in nf4.items():
                    self._buffers[name] = buf.to(target)
        return result

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, quant=nf4(double_quant={self.double_quant}, "
            f"bytes={self.nf4_bytes():,}, rel_error={self.nf4_relative_error:.2e})"
        )


def _check_quant_type(quant_type: str, module_name: str | None) -> None:
    if quant_type not in QUANT_TYPES:
        where = f" for {module_name!r}" if module_name else ""
        raise ValueError(
            f"QFusedBTTLinear{where}: quant_type={quant_type!r} is not supported; expected one of {QUANT_TYPES}"
        )
