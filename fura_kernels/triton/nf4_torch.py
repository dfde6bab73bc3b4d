"""NF4 matmuls in plain PyTorch: the CPU path, float64, and the fallback of every kernel.

torch_nf4_matmul(a, state, transpose)  = a @ Lt^T  (a: (T, K) -> (T, N)), or with
                                         `transpose` a @ Lt (a: (T, N) -> (T, K)),
Lt = dequantize_nf4(state, ...) rounded to the core's own dtype and computed in a's dtype.
"""

from __future__ import annotations

import torch

from ..nf4 import NF4Tensor, dequantize_nf4


def torch_nf4_dequantize(state: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) core in `dtype`, rounded through the core's own dtype as the kernels do."""
    return dequantize_nf4(state).to(dtype)


def torch_nf4_matmul(a: torch.Tensor, state: NF4Tensor, transpose: bool = False) -> torch.Tensor:
    dense = torch_nf4_dequantize(state, a.dtype)
    return a @ dense if transpose else a @ dense.t()
