"""Block-diagonal kernels under the FuRA autograd Function: tensors in, tensors out.

- `kernels.py`: the Triton kernels K1 (block-diagonal matmul), K3 (its fused backward) and the
  segmented transform (many adapters' maps over one mixed batch);
- `autotuning.py`: their configs, pruning, T buckets and the deterministic split of T;
- `launchers.py`: Python launchers of the kernels;
- `block_diag.py`: the PyTorch implementations (CPU, float64, fallback);
- `ops.py`: `torch.library` custom ops that pick one of the two; the names exported here.

Launchers here never see autograd state.
"""

from .block_diag import accumulate_dtype
from .ops import block_diag_matmul, block_diag_matmul_backward, segmented_block_transform, use_triton

__all__ = [
    "accumulate_dtype",
    "block_diag_matmul",
    "block_diag_matmul_backward",
    "segmented_block_transform",
    "use_triton",
]
