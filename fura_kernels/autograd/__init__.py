"""Autograd Functions over the kernels in `fura_kernels.triton`."""

from .fura_linear import FuRALinearFunction, fura_linear, use_weight_side_merge
from .qfura_linear import QFuRALinearFunction, qfura_linear
from .step2 import Step2SScaledBmm, step2_s_scaled_bmm
from .transform import BlockTransformFunction, block_transform

__all__ = [
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
