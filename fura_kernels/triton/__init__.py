"""Block-diagonal primitives under the FuRA autograd Function: tensors in, tensors out.

Launchers here never see autograd state. Today they run in PyTorch on every device; the
Triton kernels (K1 and K3 of FURA_SPEC.md §4) plug in behind the same signatures.
"""

from .block_diag import accumulate_dtype, block_diag_matmul, block_diag_matmul_backward

__all__ = ["accumulate_dtype", "block_diag_matmul", "block_diag_matmul_backward"]
