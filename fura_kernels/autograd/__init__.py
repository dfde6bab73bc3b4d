"""Autograd Functions over the kernels in `fura_kernels.triton`."""

from .fura_linear import FuRALinearFunction, fura_linear, use_weight_side_merge
from .step2 import Step2SScaledBmm, step2_s_scaled_bmm

__all__ = ["FuRALinearFunction", "Step2SScaledBmm", "fura_linear", "step2_s_scaled_bmm", "use_weight_side_merge"]
