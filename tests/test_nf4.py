"""NF4 in plain PyTorch against bitsandbytes' own quantize_4bit / dequantize_4bit, on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from fura_kernels import nf4
from fura_kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 128), (37, 128), (3, 50), (512, 320), (1, 1), (7, 9), (300, 1024)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _weight(shape, dtype, scale):
    return (torch.randn(*shape) * scale).to(dtype)


def test_dynamic_code_matches_bitsandbytes():
    assert torch.equal(nf4.dynamic_code(), bnb_functional.create_dynamic_map().float())


def test_nf4_levels_match_bitsandbytes():
    assert torch.equal(nf4.nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_without_double_quant_is_bit_exact(shape, dtype, scale):
    w = _weight(shape, dtype, scale)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_with_double_quant_is_bit_exact(shape, dtype):
    w = _weight(shape, dtype, 1.0)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, double_quant=True)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.offset.reshape(()), state.offset.reshape(()))
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))


def test_dynamic_code_index_matches_bitsandbytes_cpu_quantiser():
    """bitsandbytes' CPU 8-bit quantiser rounds to a 16-bit grid before its table lookup, so
    near zero and near midpoints it does not take the nearest entry; ours must pick the same.
    Each value sits in a block whose absmax is 1, so it is quantised as is."""
    code = nf4.dynamic_code()
    midpoints = (code[:-1] + code[1:]) / 2
    values = torch.cat([
        code, midpoints, torch.nextafter(midpoints, torch.tensor(-2.0)), torch.nextafter(midpoints, torch.tensor(2.0)),
        torch.linspace(-1e-4, 1e-4, 2001), torch.rand(20000) * 2 - 1,
    ]).clamp(-1, 1)  # fmt: skip
    blocks = torch.zeros(values.numel(), 256)
    blocks[:, 0], blocks[:, 1] = 1.0, values
    theirs, bnb_state = bnb_functional.quantize_blockwise(blocks.reshape(-1), blocksize=256)
    assert torch.all(bnb_state.absmax == 1.0)
    ours = nf4._dynamic_code_index(values)
    assert torch.equal(ours.to(torch.uint8), theirs.view(-1, 256)[:, 1])
    # It is not the nearest-entry rule: zero itself is not stored as the zero entry.
    assert int(ours[code.numel() // 2 - 1]) != int(torch.argmin((code - code[code.numel() // 2 - 1]).abs()))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unpack_of_bitsandbytes_states_is_bit_exact(shape, dtype, double_quant):
    w = _weight(shape, dtype, 2.0)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = NF4Tensor.from_bnb(packed, state)
    assert ours.double_quant == double_quant
    assert torch.equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))
    # and back: a state we hand to bitsandbytes dequantises identically there
    packed2, state2 = ours.to_bnb()
    assert torch.equal(bnb_functional.dequantize_4bit(packed2, state2), bnb_functional.dequantize_4bit(packed, state))


def test_storage_is_about_half_a_byte_per_value():
    state = quantize_nf4(torch.randn(1024, 1024, dtype=torch.bfloat16), double_quant=True)
    assert state.storage_bytes() / (1024 * 1024) < 0.52
    assert quantize_nf4(torch.randn(1024, 1024), double_quant=False).storage_bytes() / (1024 * 1024) < 0.57


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: setattr(s, "packed", s.packed[:-1]), "packed bytes"),
        (lambda s: setattr(s, "absmax", s.absmax[:-1]), "absmax values for"),
        (lambda s: setattr(s, "nested_absmax", torch.full_like(s.nested_absmax, float("nan"))), "NaN or inf"),
        (lambda s: setattr(s, "nested_code", s.nested_code[:100]), "256 values"),
        (lambda s: setattr(s, "absmax", s.absmax.float()), "expected uint8"),
        (lambda s: setattr(s, "packed", s.packed.to(torch.int16)), "expected uint8"),
    ],
)
def test_validate_names_the_corruption(corrupt, message):
    state = quantize_nf4(torch.randn(64, 256), double_quant=True)
    state.validate()
    corrupt(state)
    with pytest.raises(ValueError, match=f"corrupt NF4 state: .*{message}"):
        state.validate("layer.q")


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"NF4Tensor.to_bnb needs bitsandbytes: pip install 'fura-kernels\[quant\]'"):
        quantize_nf4(torch.randn(8, 64)).to_bnb()
