"""The reference's unfused FuRA algorithm, re-implemented from FURA_SPEC.md §2 for comparison.

It performs the same operations as the published reference forward (default layout): a
transpose-copy of `x`, a `bmm` with R, a permute-copy, `L ⊙ S` materialised (a weight-sized
tensor, every step), a `bmm`, the bias. Left to plain autograd, its backward runs the full
weight-gradient GEMM `d(L⊙S) = inner^T · dy` only to reduce it to `dS`: about 3.05 D FLOPs a
step for Llama shapes, against fura-kernels' 2 D (1 + 1.5 b/out).

Benchmarks time it next to `FusedBTTLinear`; tests check that both compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from fura_kernels import FusedBTTLinear
from fura_kernels.reference import core_dims


def reference_unfused_forward(
    x: torch.Tensor,
    btt_l: torch.Tensor,
    btt_r: torch.Tensor,
    btt_s: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The reference's forward, step for step; `x` (..., in), all tensors in one dtype."""
    m, n, a, b, r = core_dims(btt_l, btt_r)
    lead = x.shape[:-1]
    tokens = x.reshape(-1, n * b).shape[0]
    x_blocks = x.reshape(tokens, n, b).transpose(0, 1).contiguous()  # transpose-copy (n, T, b)
    inner = torch.bmm(x_blocks, btt_r)  # (n, T, m*r)
    inner = inner.reshape(n, tokens, m, r).permute(2, 1, 0, 3).reshape(m, tokens, n * r)  # permute-copy
    scaled_l = btt_l if btt_s is None else btt_l * btt_s.reshape(m, n * r, 1)  # L ⊙ S: weight-sized
    out = torch.bmm(inner, scaled_l)  # (m, T, a)
    out = out.permute(1, 0, 2).reshape(*lead, m * a)
    return out if bias is None else out + bias


class ReferenceBTTLinear(nn.Module):
    """A `FusedBTTLinear`'s parameters run through the reference's unfused algorithm."""

    def __init__(self, layer: FusedBTTLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer

        def cast(t):
            return None if t is None else t.to(x.dtype)

        return reference_unfused_forward(x, cast(layer.btt_l), cast(layer.btt_r), cast(layer.btt_s), cast(layer.bias))
