"""GPU tier for mixed-adapter batches (issue 25): the segmented kernel at Llama widths against
float64, and a bf16 model's mixed batch (logits and greedy tokens through the KV cache) against
each adapter run alone."""

from __future__ import annotations

import pytest
import torch

from fura_kernels.peft.mixed import BASE_ADAPTER, MixedBatch
from fura_kernels.triton import segmented_block_transform, use_triton
from fura_kernels.triton.block_diag import torch_segmented_block_transform

from ..helpers import DTYPE_IDS, assert_within_rule, max_rel_err, tiny_llama

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("width", [(64, 64), (112, 128), (32, 96)], ids=["b64", "b128", "b96"])
@pytest.mark.parametrize("phase", [(64, 1), (16, 512)], ids=["decode64", "prefill16x512"])
def test_segmented_kernel_at_llama_widths(dtype, width, phase):
    """64 sequences of one token or 16 of 512, over 16 adapters and the base, unevenly."""
    nblk, b = width
    sequences, per_sequence = phase
    names = [f"a{(i * 7) % 16}" if i % 5 else BASE_ADAPTER for i in range(sequences)]
    mixed = MixedBatch(names, tuple(f"a{k}" for k in range(16)))
    routing = mixed.routing(per_sequence, torch.device(DEVICE))
    slots = torch.tensor([*range(16), -1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(sequences * per_sequence, nblk, b, device=DEVICE, dtype=dtype)
    maps = (torch.randn(16, nblk, b, b, device=DEVICE) / b**0.5).to(dtype)  # as served: the base dtype
    assert use_triton(x)
    y = segmented_block_transform(x, maps, routing.rows, routing.group_offsets, slots, routing.largest_group)
    same = torch_segmented_block_transform(x, maps, routing.rows, routing.group_offsets, slots)
    ref = x.double().clone()
    offsets = routing.group_offsets.tolist()
    for group in range(16):
        index = routing.rows[offsets[group] : offsets[group + 1]].long()
        ref[index] = torch.einsum("tjk,jkn->tjn", x[index].double(), maps[group].double())
    assert_within_rule(y, same, ref, dtype, "segmented transform")
    base_rows = routing.rows[offsets[16] :].long()
    assert torch.equal(y[base_rows], x[base_rows])


IDS = torch.randint(0, 97, (6, 10), generator=torch.Generator().manual_seed(4))
NAMES = ["a1", BASE_ADAPTER, "a0", "a2", "a1", "a0"]


def _served_bf16(directory):
    """A bf16 tiny Llama on the GPU serving three FuRA adapters trained (fp32, CPU) from three seeds."""
    from peft import PeftModel

    from ..test_peft_method import _peft, _train

    for k, seed in enumerate((0, 1, 2)):
        model = _train(_peft(tiny_llama(hidden_size=128, intermediate_size=256), task_type="CAUSAL_LM"), seed=seed)
        model.save_pretrained(directory / f"a{k}")
    base = tiny_llama(hidden_size=128, intermediate_size=256).to(DEVICE, torch.bfloat16)
    model = PeftModel.from_pretrained(base, directory / "a0", adapter_name="a0")
    for k in (1, 2):
        model.load_adapter(str(directory / f"a{k}"), adapter_name=f"a{k}")
    return model.eval()


def test_serving_from_the_maps_frees_the_adapters_tensors_and_answers_the_same(tmp_path):
    from fura_kernels.peft import FuRALinear, serve_from_maps

    model = _served_bf16(tmp_path)
    ids = IDS.to(DEVICE)
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=NAMES).logits
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    moved = serve_from_maps(model)
    torch.cuda.synchronize()
    assert moved > 0 and allocated - torch.cuda.memory_allocated() >= moved
    layers = [m for m in model.modules() if isinstance(m, FuRALinear)]
    assert all(layer.fura_R[name].device.type == "cpu" for layer in layers for name in layer.fura_R)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, adapter_names=NAMES).logits, before)
    model.to(DEVICE)  # the tensors come back; the maps are built again from them
    with torch.no_grad():
        assert max_rel_err(model(input_ids=ids, adapter_names=NAMES).logits.float(), before.float()) <= 2.0**-7


def test_bf16_model_mixed_batch_equals_each_adapter_alone(tmp_path):
    model = _served_bf16(tmp_path)
    ids = IDS.to(DEVICE)
    names = NAMES

    def alone(name, fn):
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                return fn()
        model.set_adapter(name)
        return fn()

    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits.float()
        each = torch.stack([alone(n, lambda: model(input_ids=ids).logits)[i] for i, n in enumerate(names)]).float()  # noqa: B023
        assert max_rel_err(mixed, each) <= 2.0**-7  # both bf16 through the same products; tiling may differ
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        tokens = model.generate(input_ids=ids, adapter_names=names, **settings)
        agree = sum(
            torch.equal(tokens[i], alone(n, lambda: model.generate(input_ids=ids, **settings))[i])  # noqa: B023
            for i, n in enumerate(names)
        )
    assert agree >= len(names) - 1, f"only {agree} of {len(names)} sequences decoded as their adapter alone"
