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
