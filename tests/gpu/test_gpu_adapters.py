"""GPU tier for adapters (issue 22): a model trained on the GPU in bf16 autocast survives its
adapter onto fresh bases in other dtypes, a swap, and merges inside CUDA autocast."""

from __future__ import annotations

import copy

import pytest
import torch

from fura_kernels import convert_to_fura, load_fura_adapter, merge_fura, save_fura_adapter

from ..helpers import max_rel_err, tiny_llama

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS.to(DEVICE)).logits.double()


def _trained(targets, seed, steps=3):
    model = tiny_llama(seed=0, hidden_size=128, intermediate_size=256).to(DEVICE)
    convert_to_fura(model, targets, progress=False)
    data = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            model(input_ids=data, labels=data).loss.backward()
        opt.step()
    return model.eval()


def _base(dtype=torch.float32):
    return tiny_llama(seed=0, hidden_size=128, intermediate_size=256).to(DEVICE, dtype)


def test_adapter_onto_fresh_bases_in_three_dtypes(tmp_path):
    model = _trained("all-linear", seed=1)
    save_fura_adapter(model, tmp_path)
    reference = _logits(model)
    for dtype in (torch.float32, torch.float64):
        assert max_rel_err(_logits(load_fura_adapter(_base(dtype), tmp_path, progress=False)), reference) < 1e-5
    own_bf16 = max_rel_err(_logits(copy.deepcopy(model).to(torch.bfloat16)), reference)
    on_bf16 = max_rel_err(_logits(load_fura_adapter(_base(torch.bfloat16), tmp_path, progress=False)), reference)
    assert on_bf16 <= 2 * own_bf16 + 2**-8


def test_swap_and_merge_inside_autocast(tmp_path):
    save_fura_adapter(_trained("all-linear", seed=1), tmp_path / "a")
    save_fura_adapter(_trained(["q_proj", "v_proj"], seed=2), tmp_path / "b")
    clean_b = load_fura_adapter(_base(), tmp_path / "b", progress=False)
    swapped = load_fura_adapter(load_fura_adapter(_base(), tmp_path / "a", progress=False), tmp_path / "b",
                                progress=False)  # fmt: skip
    assert max_rel_err(_logits(swapped), _logits(clean_b)) < 1e-5
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        merged = merge_fura(copy.deepcopy(clean_b))
    layer = clean_b.model.layers[0].self_attn.q_proj
    assert max_rel_err(merged.model.layers[0].self_attn.q_proj.weight, layer.to_linear().weight) < 1e-6
