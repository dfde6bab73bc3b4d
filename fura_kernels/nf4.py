"""NF4 storage in bitsandbytes' exact format, in plain PyTorch (FURA_SPEC.md §5).

A tensor of shape (N, K) is flattened row-major and cut into blocks of 64 values. Each block is
scaled by its absolute maximum (`absmax`, fp32) and every value is replaced by the index of the
nearest of the 16 NF4 levels (ties go to the lower level); byte `i` of the packed buffer holds
element `2i` in its high nibble and `2i + 1` in its low nibble. With double quantisation the
absmax values are themselves stored in 8 bits: `offset = absmax.mean()`, then `absmax - offset`
is quantised blockwise (blocks of 256) with bitsandbytes' signed dynamic code.

This module is the CPU implementation, the validator and the interchange with bitsandbytes:
`quantize_nf4` / `dequantize_nf4` are bit-for-bit equal to `bitsandbytes.functional.
quantize_4bit` / `dequantize_4bit` (tests/test_nf4.py checks it), and `NF4Tensor.from_bnb` /
`to_bnb` convert states both ways. The Triton kernels read the same buffers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .optional import require

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels, fp32, ascending."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (Dettmers et al., 2022), 256 fp32 values, ascending.

    For exponent `e = 0..6` the interval (0.1, 1] is cut into `2^e` equal steps; the step
    midpoints, scaled by `10^(e - 6)`, are the magnitudes, taken with both signs; 0 and 1 close
    the table. Boundaries, midpoints and scaling are computed in fp32 as bitsandbytes does, so
    the values match its `create_dynamic_map()` exactly.
    """
    values: list[float] = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _nearest_level(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ascending table); a value on a midpoint takes the lower."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True)


# bitsandbytes' CPU quantiser of 8-bit blockwise codes does not search the table for the
# nearest entry: it rounds the normalised value to a grid of 65536 points on [-1, 1],
# u = floor((x + 1) * 32767.5 + 0.5) in fp32, then takes the entry nearest to grid point u.
# Near table midpoints and near zero (where entries lie closer than the grid step) that is
# not the nearest entry. Measured on bitsandbytes 0.50.2 by bisecting its decision points,
# which all sit on half-grid points; tests/test_nf4.py checks the result bit for bit.
_GRID_HALF_SPAN = 32767.5


@functools.cache
def _grid_table() -> torch.Tensor:
    """For each of the 65536 grid points, the index of the nearest dynamic-code entry."""
    grid = torch.arange(65536, dtype=torch.float64) / _GRID_HALF_SPAN - 1
    return _nearest_level(grid, dynamic_code().double()).long()


def _dynamic_code_index(scaled: torch.Tensor) -> torch.Tensor:
    """8-bit dynamic-code indices of values in [-1, 1], as bitsandbytes' CPU quantiser picks them."""
    grid = torch.floor((scaled.float() + 1.0) * _GRID_HALF_SPAN + 0.5).clamp(0, 65535)
    return _grid_table().to(scaled.device)[torch.nan_to_num(grid).long()]


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    padded = torch.nn.functional.pad(flat.abs(), (0, pad))
    return padded.view(-1, blocksize).amax(dim=1)


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`flat / absmax[block]` as `flat * (1 / absmax)`, clamped to [-1, 1] (bitsandbytes' order of
    operations, which matters for bit-exact codes)."""
    inverse = 1.0 / absmax.clamp(min=1e-38)
    return torch.clamp(flat * inverse.repeat_interleave(blocksize)[: flat.numel()], -1, 1)


@dataclass
class NF4Tensor:
    """A quantised (N, K) tensor: packed codes and (possibly double-quantised) absmax.

    - `packed`: uint8 (ceil(N*K / 2), 1);
    - `absmax`: fp32 (blocks,), or uint8 (blocks,) when `double_quant`;
    - `offset`, `nested_absmax` (fp32 (ceil(blocks / 256),)), `nested_code` (fp32 (256,)):
      only with double quantisation;
    - `shape`, `dtype`: of the original tensor (the dtype dequantisation returns).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    blocksize: int = BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def storage_bytes(self) -> int:
        """Bytes held: codes, absmax and the nested statistics."""
        tensors = [self.packed, self.absmax, self.offset, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as named tensors (for state dicts and safetensors)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(offset=self.offset, nested_absmax=self.nested_absmax, nested_code=self.nested_code)
        return out

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4Tensor(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize, **moved)

    def validate(self, where: str = "NF4Tensor") -> None:
        """Raise a ValueError naming what is inconsistent (a corrupt or mismatched state)."""
        rows, cols = self.shape
        n = rows * cols
        blocks = -(-n // self.blocksize)

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"{where}: corrupt NF4 state: {what}")

        need(self.blocksize == BLOCKSIZE, f"blocksize {self.blocksize}, expected {BLOCKSIZE}")
        need(self.packed.dtype == torch.uint8, f"packed dtype {self.packed.dtype}, expected uint8")
        need(
            self.packed.numel() == (n + 1) // 2,
            f"{self.packed.numel()} packed bytes for {n} values, expected {(n + 1) // 2}",
        )
        need(self.absmax.numel() == blocks, f"{self.absmax.numel()} absmax values for {blocks} blocks")
        need(self.dtype.is_floating_point, f"dtype {self.dtype} is not floating point")
        if self.double_quant:
            need(self.absmax.dtype == torch.uint8, f"double-quantised absmax dtype {self.absmax.dtype}, expected uint8")
            nested = -(-blocks // NESTED_BLOCKSIZE)
            need(
                self.nested_absmax is not None and self.nested_absmax.numel() == nested,
                f"nested absmax has {None if self.nested_absmax is None else self.nested_absmax.numel()} values, "
                f"expected {nested}",
            )
            need(self.nested_code is not None and self.nested_code.numel() == 256, "nested code must hold 256 values")
            need(self.offset.numel() == 1, "offset must be one value")
            need(bool(torch.isfinite(self.nested_absmax).all()), "nested absmax holds NaN or inf")
        else:
            need(self.absmax.dtype == torch.float32, f"absmax dtype {self.absmax.dtype}, expected float32")
            need(bool(torch.isfinite(self.absmax).all()), "absmax holds NaN or inf")

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of every 64-value block (undoing double quantisation)."""
        if not self.double_quant:
            return self.absmax
        nested = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        return self.nested_code[self.absmax.long()] * nested + self.offset

    # --- bitsandbytes interchange -------------------------------------------------------------
    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Tensor:
        """From `bitsandbytes.functional.quantize_4bit`'s `(packed, QuantState)`."""
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"NF4Tensor.from_bnb: quant_type {quant_state.quant_type!r}, expected 'nf4'")
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"NF4Tensor.from_bnb: expected a 2-D quantised tensor, got shape {shape}")
        nested = getattr(quant_state, "state2", None)
        state = cls(
            packed=packed.view(torch.uint8).reshape(-1, 1),
            absmax=quant_state.absmax,
            shape=shape,
            dtype=quant_state.dtype,
            offset=None if nested is None else quant_state.offset.reshape(1).float(),
            nested_absmax=None if nested is None else nested.absmax,
            nested_code=None if nested is None else nested.code,
            blocksize=quant_state.blocksize,
        )
        state.validate("NF4Tensor.from_bnb")
        return state

    def to_bnb(self):
        """`(packed, QuantState)` for bitsandbytes (which must be installed)."""
        functional = require_bitsandbytes("NF4Tensor.to_bnb").functional
        nested = None
        if self.double_quant:
            nested = functional.QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
            )
        state = functional.QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=nf4_code(self.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=None if nested is None else self.offset.reshape(()),
            state2=nested,
        )
        return self.packed, state


def require_bitsandbytes(what: str):
    """Import bitsandbytes or raise an ImportError that says who needed it and how to get it."""
    return require("bitsandbytes", "quant", what)


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> NF4Tensor:
    """Quantise a 2-D floating tensor to NF4, bit-for-bit as bitsandbytes does (blocksize 64)."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"quantize_nf4: expected a 2-D floating tensor, got {weight.dtype} {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1).float()
    absmax = _blockwise_absmax(flat, BLOCKSIZE)
    scaled = _scale_blocks(flat, absmax, BLOCKSIZE)
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble encodes a 0.0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = _nearest_level(scaled, nf4_code(flat.device)).to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    state = NF4Tensor(packed=packed, absmax=absmax, shape=tuple(weight.shape), dtype=weight.dtype)
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        nested_absmax = _blockwise_absmax(centred, NESTED_BLOCKSIZE)
        code = dynamic_code(flat.device)
        scaled = _scale_blocks(centred, nested_absmax, NESTED_BLOCKSIZE)
        # The table entry bitsandbytes' CPU quantiser picks (see `_dynamic_code_index`).
        # A block whose deviations are all zero divides 0 by 0 in bitsandbytes and stores
        # index 0; any index decodes to the same scale there (0 * code + offset).
        codes = _dynamic_code_index(scaled)
        flat_zero = (nested_absmax == 0).repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
        state.absmax = torch.where(flat_zero, torch.zeros_like(codes), codes).to(torch.uint8)
        state.offset = offset.reshape(1)
        state.nested_absmax = nested_absmax
        state.nested_code = code
    return state


def dequantize_nf4(state: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (N, K) tensor a state holds: `level[code] * absmax` in fp32, then cast to `dtype`
    (the original dtype by default)."""
    flat = state.packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[: state.numel].long()
    values = nf4_code(flat.device)[codes]
    scales = state.block_scales().repeat_interleave(state.blocksize)[: state.numel]
    return (values * scales).reshape(state.shape).to(dtype or state.dtype)
