"""Autograd Functions over the kernels in `fura_kernels.triton`."""

from .fura_linear import FuRALinearFunction, fura_linear

__all__ = ["FuRALinearFunction", "fura_linear"]
