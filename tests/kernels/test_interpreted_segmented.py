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


def test_a_mixed_batch_through_the_kernel_equals_each_adapter_alone(monkeypatch):
    """The layer path end to end on the kernels: a tiny Llama with two FuRA adapters (PEFT form)
    answers a mixed batch through the segmented kernel, each adapter alone through K1."""
    from peft import get_peft_model

    from fura_kernels.peft import FuRALinear, FuRAPeftConfig
    from fura_kernels.triton import launchers

    from ..helpers import max_rel_err, tiny_llama

    def config():
        return FuRAPeftConfig(target_modules=["q_proj", "v_proj", "down_proj"], progress_bar=False)

    model = get_peft_model(tiny_llama(), config(), adapter_name="a")
    model.add_adapter("b", config())
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, FuRALinear):
                for name in ("a", "b"):
                    layer.fura_R[name].add_(0.1 * torch.randn(layer.fura_R[name].shape, generator=generator))
                    layer.fura_S[name].mul_(1 + 0.2 * torch.randn(layer.fura_S[name].shape, generator=generator))
    model.eval()
    ids = torch.randint(0, 97, (4, 5), generator=generator)
    names = ["b", "__base__", "a", "b"]
    launches = []
    kernel = launchers.triton_segmented_block_transform
    monkeypatch.setattr(launchers, "triton_segmented_block_transform", lambda *a: launches.append(1) or kernel(*a))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    assert len(launches) == 6  # one a layer: 2 decoder layers x 3 targets, whatever the adapters
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            alone["__base__"] = model(input_ids=ids).logits
    expected = torch.stack([alone[name][i] for i, name in enumerate(names)])
    assert max_rel_err(mixed, expected) <= 1e-5
    assert max_rel_err(alone["a"], alone["b"]) > 1e-2  # the adapters differ: a misrouted row would show
