"""Test helpers: the tolerance rule and tiny models."""

from __future__ import annotations

import torch

# atol of the tolerance rule, relative to the reference's largest magnitude. The rule
# (STYLE.md, from flash-attention):  max|ours - ref| <= 2 * max|torch_same_dtype - ref| + atol.
# atol only absorbs the case where torch's own error happens to be tiny: one unit in the last
# place of each dtype at the output's scale (2^-11 for fp16, 2^-8 for bf16), so it cannot make
# the check vacuous.
ATOL_REL = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def assert_within_rule(ours: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str):
    """The STYLE.md tolerance rule, against a float64 (or fp32) reference."""
    ref = ref.double()
    err = (ours.double() - ref).abs().max().item()
    base = (same_dtype.double() - ref).abs().max().item()
    atol = ATOL_REL[dtype] * ref.abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 * torch's {base:.3e} + atol {atol:.3e} ({dtype})"


def unfused_same_dtype(layer, x: torch.Tensor) -> torch.Tensor:
    """The "torch, same dtype" side of the rule for a FuRA layer: the unfused einsum algorithm
    (`fura_kernels.reference`) on the layer's own cores, all cast to `x.dtype`, differentiable.

    This, not `nn.Linear`, is the fair baseline in half precision: FuRA rounds at two stages
    (z = x·R' and y = z·L), so any implementation of it carries about 2-3x the rounding error
    of one dense GEMM in bf16."""
    from fura_kernels import reference

    def cast(t):
        return None if t is None else t.to(x.dtype)

    return reference.forward(x, cast(layer.btt_l), cast(layer.btt_r), cast(layer.btt_s), cast(layer.bias))


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama with random weights from a transformers config (fp32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    return model


def train_causal_lm(model, steps: int, lr: float = 1e-2, n_batches: int = 1, seed: int = 0) -> list[float]:
    """AdamW on the model's trainable tensors over `n_batches` fixed random batches (4 x 16),
    cycled; returns the per-step losses and leaves the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, model.config.vocab_size, (4, 16), generator=generator) for _ in range(n_batches)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(steps):
        data = batches[step % n_batches]
        opt.zero_grad()
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def check_qfura_layer(layer, tokens: int, dtype: torch.dtype) -> None:
    """A QFuRA layer's output and every gradient against float64 on its dequantised core, by
    the tolerance rule (the unfused algorithm in `dtype` is the same-dtype side)."""
    import copy

    from fura_kernels import reference

    l64 = layer.dequantized_l(torch.float64)
    params = [layer.btt_r, layer.btt_s, layer.bias]
    x = torch.randn(tokens, layer.in_features)
    dy = torch.randn(tokens, layer.out_features)
    x_low = x.to(dtype).requires_grad_()
    y = layer(x_low)
    ours = torch.autograd.grad((y * dy.to(dtype)).sum(), [x_low, *params])
    x_same = x.to(dtype).requires_grad_()
    y_same = reference.forward(x_same, l64.to(dtype), *(p.to(dtype) for p in params))
    same = torch.autograd.grad((y_same * dy.to(dtype)).sum(), [x_same, *params])
    ref_params = [copy.deepcopy(p.detach()).double().requires_grad_() for p in params]
    x64 = x.double().requires_grad_()
    y_ref = reference.forward(x64, l64, *ref_params)
    ref = torch.autograd.grad((y_ref * dy.double()).sum(), [x64, *ref_params])
    assert_within_rule(y.detach(), y_same.detach(), y_ref.detach(), dtype, "QFuRA y")
    for name, g, g_same, g_ref in zip(("x", "R", "S", "bias"), ours, same, ref, strict=True):
        assert g.dtype == (dtype if name == "x" else torch.float32), name
        assert_within_rule(g, g_same, g_ref, dtype, f"QFuRA d{name}")


def naive_block_svd(weight: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block thin SVD with plain `torch.linalg.svd`, block by block, no sign fixing.

    A second, deliberately naive code path (test tooling, so not in the package): it checks the
    batched, sign-canonical decomposition in `fura_kernels.factorization`. Returns U (m, n, a, k), S (m, n, k),
    Vh (m, n, k, b) with k = min(a, b).
    """
    out_f, in_f = weight.shape
    a, b = out_f // m, in_f // n
    us, ss, vhs = [], [], []
    for i in range(m):
        for j in range(n):
            u, s, vh = torch.linalg.svd(weight[i * a : (i + 1) * a, j * b : (j + 1) * b], full_matrices=False)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    k = min(a, b)
    return (
        torch.stack(us).reshape(m, n, a, k),
        torch.stack(ss).reshape(m, n, k),
        torch.stack(vhs).reshape(m, n, k, b),
    )
