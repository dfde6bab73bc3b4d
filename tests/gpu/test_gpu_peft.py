"""GPU tier for FuRA's PEFT form (issue 23): the transform layer on the Triton kernels at real
widths against float64, a bf16 model trained under autocast, and FuRA on a bitsandbytes NF4 base
(QLoRA's) loaded through transformers' BitsAndBytesConfig path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fura_kernels import reference
from fura_kernels.peft import FuRALinear, FuRAPeftConfig

from ..helpers import assert_within_rule, max_rel_err, tiny_llama

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(4096, 1024, [64, 64]), (14336, 4096, [112, 128])], ids=["k_proj", "down_proj"])
def test_transform_layer_at_llama_widths(dtype, shape):
    in_f, out_f, factorization = shape
    torch.manual_seed(0)
    config = FuRAPeftConfig(input_factorization=factorization, progress_bar=False)
    base = nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=dtype)
    layer = FuRALinear(base, "default", config, module_name="proj")
    r, s = layer.fura_R["default"], layer.fura_S["default"]
    with torch.no_grad():
        r.add_(0.02 * torch.randn_like(r))
        s.mul_(1 + 0.1 * torch.randn_like(s))
    x = torch.randn(1000, in_f, device=DEVICE)
    dy = torch.randn(1000, out_f, device=DEVICE)

    def unfused(x, r, s, dt):
        maps = reference.transform_blocks(r.to(dt), s.to(dt), layer.fura_V0["default"].to(dt),
                                          layer.fura_S0["default"].to(dt))  # fmt: skip
        return reference.transform_forward(x, maps) @ layer.get_base_layer().weight.to(dt).t()

    x_low = x.to(dtype).requires_grad_()
    y = layer(x_low)
    ours = torch.autograd.grad((y * dy.to(dtype)).sum(), [x_low, r, s])
    x_same, r_same, s_same = x.to(dtype).requires_grad_(), r.detach().requires_grad_(), s.detach().requires_grad_()
    y_same = unfused(x_same, r_same, s_same, dtype)
    same = torch.autograd.grad((y_same * dy.to(dtype)).sum(), [x_same, r_same, s_same])
    x64, r64, s64 = (t.detach().double().requires_grad_() for t in (x, r, s))
    y64 = unfused(x64, r64, s64, torch.float64)
    ref = torch.autograd.grad((y64 * dy.double()).sum(), [x64, r64, s64])
    assert_within_rule(y.detach(), y_same.detach(), y64.detach(), dtype, "y")
    for name, g, g_same, g_ref in zip(["x", "R", "S"], ours, same, ref, strict=True):
        assert_within_rule(g, g_same, g_ref, dtype, f"d{name}")


def test_bf16_model_trains_under_autocast_and_reloads(tmp_path):
    from peft import PeftModel, get_peft_model

    def base():
        return tiny_llama(seed=0, hidden_size=128, intermediate_size=256).to(DEVICE, torch.bfloat16)

    ids = torch.randint(0, 97, (2, 12), device=DEVICE)
    model = get_peft_model(base(), FuRAPeftConfig(target_modules="all-linear", progress_bar=False))
    with torch.no_grad():
        assert max_rel_err(model(input_ids=ids).logits, base()(input_ids=ids).logits) <= 2e-2  # bf16 rounding
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_fura_on_a_qlora_base_from_bitsandbytes_config(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=0, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map=DEVICE)
    ids = torch.randint(0, 97, (2, 12), device=DEVICE)
    with torch.no_grad():
        reference_logits = base(input_ids=ids).logits.float()
    prepared = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(prepared, FuRAPeftConfig(target_modules="all-linear", progress_bar=False))
    with torch.no_grad():
        assert max_rel_err(model(input_ids=ids).logits.float(), reference_logits) <= 2e-2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
