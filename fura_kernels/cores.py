"""The L core of a FuRA layer as a component: a dense core or an NF4 core.

A `FusedBTTLinear` holds its L core as the submodule `l_core`, one of:

- `DenseCore`: L as a plain parameter `btt_l` (m, n*r, a), frozen or trained;
- `NF4Core`: a frozen L of the default layout (m = 1) stored as bitsandbytes NF4 (QFuRA).

Both answer the same questions (`dtype`, `materialize`, `linear`, `storage_bytes`), so the layer,
the adapters and the conversion code never ask which one they hold.

Design note on `NF4Core`: `.to(torch.bfloat16)`, `.half()` and friends cast every floating
tensor of a module. NF4's fp32 statistics (absmax without double quantisation, the offset, the
nested absmax and code) must never be rounded, so they are stored as their raw bits in int32
buffers, which those casts leave alone, and read back as fp32 views (no copy). The dtype the core
dequantises to is carried by an empty, non-persistent floating buffer, so module casts move it
exactly as they would move a dense core's dtype. Every buffer is a plain registered tensor, so
`to_empty`, meta-device construction and state dicts work as for any module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .autograd import apply_fura_linear, apply_qfura_linear
from .distributed import full_tensor
from .nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Tensor, dequantize_nf4, quantize_nf4

QUANT_TYPES = ("nf4",)


class DenseCore(nn.Module):
    """L as a dense parameter `btt_l` of shape (m, n*r, a) (layout in `fura_kernels.reference`)."""

    quant_type = None
    double_quant = None

    def __init__(
        self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device | str | None, trainable: bool
    ) -> None:
        super().__init__()
        self.btt_l = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=trainable)

    @property
    def dtype(self) -> torch.dtype:
        return self.btt_l.dtype

    @property
    def dense_parameter(self) -> nn.Parameter:
        return self.btt_l

    def materialize(self, dtype: torch.dtype, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """L (m, n*r, a) in `dtype`, differentiable; from `state` (this core's state dict) if given."""
        core = self.btt_l if state is None else state["btt_l"]
        return core.to(dtype)

    def probe_values(self, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole core, fp32, gathered if sharded (a collective under FSDP2: every rank calls)."""
        core = full_tensor(self.btt_l.detach()) if state is None else state["btt_l"]
        return core.float()

    def linear(self, x, btt_r, btt_s, bias) -> torch.Tensor:
        """`x · W^T + bias` for `x` (..., in) in its compute dtype (the layer has checked it)."""
        return apply_fura_linear(x, self._parameters["btt_l"], btt_r, btt_s, bias)

    def storage_bytes(self) -> int:
        return self.btt_l.numel() * self.btt_l.element_size()


def _quantize(core: torch.Tensor, double_quant: bool) -> NF4Tensor:
    """NF4-quantise through bitsandbytes when it is installed (the format's owner), else with
    the pure-PyTorch writer of `fura_kernels.nf4` (bit-exact with bitsandbytes' CPU quantiser)."""
    try:
        from bitsandbytes import functional as bnb_functional
    except ImportError:
        return quantize_nf4(core, double_quant)
    packed, state = bnb_functional.quantize_4bit(core, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return NF4Tensor.from_bnb(packed, state)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous().view(torch.int32)


class NF4Core(nn.Module):
    """A frozen L of the default layout, `Lt = L[0]^T` (out x n*r), stored as NF4.

    Buffers: `packed` (uint8, two values a byte); with double quantisation `absmax` (uint8
    codes) and `offset_bits`, `nested_absmax_bits`, `nested_code_bits` (fp32 as int32 bits),
    without it `absmax_bits` (fp32 as int32 bits). About 0.516 bytes a value, against 2 for bf16.
    """

    quant_type = "nf4"

    def __init__(
        self,
        out_features: int,
        inner: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
        double_quant: bool = True,
        label: str = "NF4Core",
    ) -> None:
        super().__init__()
        self.shape = (out_features, inner)
        self.double_quant = double_quant
        self.label = label
        numel = out_features * inner
        blocks = -(-numel // BLOCKSIZE)
        self.register_buffer("packed", torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("offset_bits", torch.empty(1, dtype=torch.int32, device=device))
            nested = -(-blocks // NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax_bits", torch.empty(nested, dtype=torch.int32, device=device))
            self.register_buffer("nested_code_bits", torch.empty(256, dtype=torch.int32, device=device))
        else:
            self.register_buffer("absmax_bits", torch.empty(blocks, dtype=torch.int32, device=device))
        self.register_buffer("dtype_carrier", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the core dequantises to (the original linear's; module casts change it)."""
        return self.dtype_carrier.dtype

    @property
    def dense_parameter(self) -> None:
        return None

    def state(self, tensors: Mapping[str, torch.Tensor] | None = None) -> NF4Tensor:
        """The core as an `NF4Tensor`: views of the buffers (or of `tensors`, this core's state
        dict), no copy."""
        t = dict(self.named_buffers()) if tensors is None else tensors

        def fp32(name: str) -> torch.Tensor:
            return t[name].view(torch.float32)

        if self.double_quant:
            return NF4Tensor(packed=t["packed"], absmax=t["absmax"], shape=self.shape, dtype=self.dtype,
                             offset=fp32("offset_bits"), nested_absmax=fp32("nested_absmax_bits"),
                             nested_code=fp32("nested_code_bits"))  # fmt: skip
        return NF4Tensor(packed=t["packed"], absmax=fp32("absmax_bits"), shape=self.shape, dtype=self.dtype)

    @torch.no_grad()
    def load_state(self, state: NF4Tensor) -> None:
        """Copy a quantised core in (validated against this core's shape and format)."""
        state.validate(self.label)
        if tuple(state.shape) != self.shape or state.double_quant != self.double_quant:
            raise ValueError(
                f"{self.label}: NF4 state of shape {state.shape} (double_quant={state.double_quant}) does not match "
                f"the layer's core {self.shape} (double_quant={self.double_quant})"
            )
        self.packed.copy_(state.packed.reshape(self.packed.shape))
        if self.double_quant:
            self.absmax.copy_(state.absmax.reshape(-1))
            self.offset_bits.copy_(_bits(state.offset.reshape(-1)))
            self.nested_absmax_bits.copy_(_bits(state.nested_absmax.reshape(-1)))
            self.nested_code_bits.copy_(_bits(state.nested_code.reshape(-1)))
        else:
            self.absmax_bits.copy_(_bits(state.absmax.reshape(-1)))

    def quantize_from(self, lt: torch.Tensor) -> float:
        """Quantise `Lt` (out x n*r) into this core; returns the relative Frobenius error."""
        state = _quantize(lt.detach().contiguous(), self.double_quant)
        self.load_state(state)
        with torch.no_grad():
            exact = lt.float()
            return ((dequantize_nf4(state, torch.float32) - exact).norm() / exact.norm()).item()

    def materialize(self, dtype: torch.dtype, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """L (1, n*r, out) dequantised into `dtype`; from `state` (this core's state dict) if given."""
        return dequantize_nf4(self.state(state), dtype).t().unsqueeze(0)

    def probe_values(self, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.materialize(torch.float32, state)

    def linear(self, x, btt_r, btt_s, bias) -> torch.Tensor:
        """`x · W^T + bias` for 2-D `x` (T, in) in its compute dtype (the layer has checked it). The
        buffers are read straight from `_buffers` (module casts and moves replace them there):
        this runs once per layer per step."""
        buffers = self._buffers
        meta = (*self.shape, buffers["dtype_carrier"].dtype)
        if self.double_quant:
            fp32 = torch.float32
            offset, nested = buffers["offset_bits"].view(fp32), buffers["nested_absmax_bits"].view(fp32)
            code = buffers["nested_code_bits"].view(fp32)
            packed, absmax = buffers["packed"], buffers["absmax"]
            return apply_qfura_linear(x, btt_r, btt_s, bias, packed, absmax, offset, nested, code, meta)
        absmax = buffers["absmax_bits"].view(torch.float32)
        return apply_qfura_linear(x, btt_r, btt_s, bias, buffers["packed"], absmax, None, None, None, meta)

    def storage_bytes(self) -> int:
        return self.state().storage_bytes()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, double_quant={self.double_quant}, dtype={self.dtype}"
