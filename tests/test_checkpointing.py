"""Non-reentrant activation checkpointing: same gradients, nothing weight-sized recomputed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from fura_kernels import FusedBTTLinear, convert_to_fura

from .helpers import max_rel_err, tiny_llama


class _K1Calls(TorchDispatchMode):
    """Records the leading dimension of every K1 input (T on the activation side, `out` for a
    weight-side merge)."""

    def __init__(self):
        super().__init__()
        self.leading = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fura_kernels.block_diag_matmul.default:
            self.leading.append((args[0].shape[0], args[0].stride(0)))
        return func(*args, **(kwargs or {}))


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_transformers_checkpointing_gives_the_same_gradients(quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    model = tiny_llama(seed=0)
    convert_to_fura(model, "all-linear", quantize=quantize, progress=False)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 32))  # T = 128 > out = 64: forward merges W_eff
    plain = _grads(model, ids)
    checkpointed_model = copy.deepcopy(model)
    checkpointed_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed_model.model.embed_tokens.weight.requires_grad_(False)
    checkpointed_model.enable_input_require_grads()
    recorder = _K1Calls()
    checkpointed_model.zero_grad(set_to_none=True)
    loss = checkpointed_model(input_ids=ids, labels=ids).loss
    with recorder:
        loss.backward()
    checkpointed = {n: p.grad for n, p in checkpointed_model.named_parameters() if p.requires_grad}
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert max_rel_err(checkpointed[name], plain[name]) < 1e-5, name
    # The backward recomputed the forwards (K1 ran), on the activation side only: every K1 input
    # led with the 128 tokens, none with a layer's output width (a weight-side merge).
    assert recorder.leading and all(lead == 128 for lead, _ in recorder.leading), recorder.leading


def test_torch_utils_checkpoint_on_a_layer():
    layer = FusedBTTLinear.from_linear(torch.nn.Linear(96, 24))
    x = torch.randn(200, 96, requires_grad=True)
    y = layer(x)
    plain = torch.autograd.grad(y.square().sum(), [x, layer.btt_r, layer.btt_s, layer.bias])
    recorder = _K1Calls()
    y = checkpoint(layer, x, use_reentrant=False)
    with recorder:
        ckpt = torch.autograd.grad(y.square().sum(), [x, layer.btt_r, layer.btt_s, layer.bias])
    for a, b in zip(plain, ckpt, strict=True):
        assert max_rel_err(b, a) < 1e-5
    assert recorder.leading == [(200, 96)]  # recomputed once, on the activation side
