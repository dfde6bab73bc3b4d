"""Autograd Functions over the kernels in `fura_kernels.triton`."""

from .fura_linear import FuRALinearFunction, apply_fura_linear, fura_linear, use_weight_side_merge
from .qfura_linear import QFuRALinearFunction, apply_qfura_linear, qfura_linear
from .step2 import Step2SScaledBmm, step2_s_scaled_bmm
from .transform import BlockTransformFunction, apply_block_transform, block_transform

__all__ = [
    "apply_block_transform",
    "apply_fura_linear",
    "apply_qfura_linear",
    "BlockTransformFunction",
    "block_transform",
    "FuRALinearFunction",
    "QFuRALinearFunction",
    "Step2SScaledBmm",
    "qfura_linear",
    "fura_linear",
    "step2_s_scaled_bmm",
    "use_weight_side_merge",
]
