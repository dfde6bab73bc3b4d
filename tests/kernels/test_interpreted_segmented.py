"""The segmented block-diagonal transform (many adapters, one launch) under Triton's interpreter.

Against the float64 product token by token, with the tolerance rule's same-dtype side from the
PyTorch path. Rows of the base model (slot -1) must come back bit for bit. The batches have
uneven groups, one-token groups, empty groups, adapters no token uses, a group whose rows are
scattered through the batch, and T = 0.
"""

from __future__ import annotations

import os

import pytest
import torch

from fura_kernels.triton import segmented_block_transform, use_triton
from fura_kernels.triton.block_diag import torch_segmented_block_transform

from ..helpers import DTYPE_IDS, assert_within_rule

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tier: run with TRITON_INTERPRET=1 (bash .ci/run does)"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# name: (group sizes, slot of each group, adapters in the stack). Slot -1 is the base model.
BATCHES = {
    "uneven": ([37, 1, 0, 70, 5], [2, 0, 1, -1, 3], 4),
    "one-token-each": ([1] * 9, [0, 1, 2, 3, -1, 0, 1, 2, 3], 4),
    "unused-adapters": ([20, 13], [4, -1], 6),
    "all-base": ([11], [-1], 1),
    "one-adapter": ([33], [0], 1),
    "empty": ([0, 0], [0, -1], 2),
}
# (nblk, b): b = 96 and a prime width leave masked edges in the 16-wide interpreter tiles.
BLOCKS = [(3, 16), (2, 96), (1, 37)]


def routing(sizes: list[int], slots: list[int], shuffle: bool, seed: int = 0):
    """`(rows, group_offsets, group_slots, largest)` for groups of `sizes` tokens; with `shuffle`
    the groups' tokens are scattered through the batch instead of lying in runs."""
    tokens = sum(sizes)
    order = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(tokens)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    return (
        order.to(torch.int32),
        offsets.to(torch.int32),
        torch.tensor(slots, dtype=torch.int32),
        max(sizes, default=0),
    )


def float64_product(x, maps, rows, offsets, slots):
    out = x.double().clone()
    for group, slot in enumerate(slots.tolist()):
        index = rows[offsets[group] : offsets[group + 1]].long()
        if slot >= 0:
            out[index] = torch.einsum("tjk,jkn->tjn", x[index].double(), maps[slot].double())
    return out


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda s: f"n{s[0]}-b{s[1]}")
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_segmented_transform_matches_float64(dtype, batch, blocks, layout):
    sizes, slots, adapters = BATCHES[batch]
    nblk, b = blocks
    rows, offsets, group_slots, largest = routing(sizes, slots, shuffle=batch != "one-adapter")
    tokens = rows.shape[0]
    if layout == "strided":  # last dim not contiguous, as a slice of a wider activation is
        x = torch.randn(tokens, nblk, 2 * b, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(tokens, nblk, b, dtype=dtype)
    maps = torch.randn(adapters, nblk, b, b) / b**0.5  # fp32, as the adapters' maps are cached
    assert use_triton(x)
    y = segmented_block_transform(x, maps, rows, offsets, group_slots, largest)
    assert y.shape == x.shape and y.dtype == dtype
    ref = float64_product(x, maps, rows, offsets, group_slots)
    same = torch_segmented_block_transform(x, maps, rows, offsets, group_slots)
    if tokens:
        assert_within_rule(y, same, ref, dtype, f"segmented transform, {batch}")
    for group, slot in enumerate(slots):
        index = rows[offsets[group] : offsets[group + 1]].long()
        if slot < 0:
            assert torch.equal(y[index], x[index]), f"base rows of group {group} changed"


def test_segmented_transform_reads_maps_in_any_float_dtype():
    """bf16 maps with fp32 activations, fp32 maps with bf16 activations: the map is cast to the
    activation dtype at the dot, as K1 does."""
    rows, offsets, slots, largest = routing([5, 9], [1, 0], shuffle=True)
    for x_dtype, map_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        x = torch.randn(14, 2, 32, dtype=x_dtype)
        maps = (torch.randn(2, 2, 32, 32) / 32**0.5).to(map_dtype)
        y = segmented_block_transform(x, maps, rows, offsets, slots, largest)
        ref = float64_product(x, maps, rows, offsets, slots)
        same = torch_segmented_block_transform(x, maps, rows, offsets, slots)
        assert_within_rule(y, same, ref, x_dtype, f"maps {map_dtype}, x {x_dtype}")
