"""fura-kernels: fast FuRA (Full-Rank Adaptation) fine-tuning for PyTorch and Hugging Face.

Public API:

- `FuRAConfig`: the factorisation and training knobs;
- `FusedBTTLinear`: a drop-in `nn.Linear` with weight `L · diag(S) · R`;
- `QFusedBTTLinear`: the same with the frozen L in NF4 (QFuRA); `quantize_nf4` / `dequantize_nf4` /
  `NF4Tensor`: bitsandbytes' NF4 format in plain PyTorch;
- `DenseCore` / `NF4Core`: the L core a layer holds (dense, or NF4 for QFuRA);
- `convert_to_fura`, `merge_fura`, `find_target_linears`, `ConversionReport`, `count_parameters`,
  `print_trainable_parameters`: whole models;
- `fura_linear` / `FuRALinearFunction`: the fused Function itself;
- `step2_s_scaled_bmm`: a drop-in for the reference's second stage (`FURA_FUSED_STEP2=1`);
- `save_fura_adapter`, `load_fura_adapter`, `save_merged`: adapter files and merged export;
- `merged_named_weights`: the merged weights under the base's names, one layer at a time (RL
  weight sync to an inference engine);
- `reference`: the einsum oracle;
- `normalize_trainable_cores_` (and in `fura_kernels.training` its optimiser hook and Trainer
  callback): the reference's core normalisation after each optimiser step;
- `SVDLinear`, `convert_to_svd`, `merge_svd` (`fura_kernels.svd_baseline`): the paper's SVD
  baseline and its random-basis ablation.

`fura_kernels.peft` (with the `[peft]` extra) makes FuRA a PEFT method, `FuRAPeftConfig`, in the
transform form over any base layer, QLoRA's 4-bit base included; import it explicitly.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

from . import reference
from .adapters import load_fura_adapter, merged_named_weights, save_fura_adapter, save_merged
from .autograd import FuRALinearFunction, fura_linear, step2_s_scaled_bmm
from .config import FuRAConfig
from .cores import DenseCore, NF4Core
from .factorization import BlockShape, closest_factor_pair
from .layer import FusedBTTLinear
from .model import (
    ConversionReport,
    convert_to_fura,
    count_parameters,
    find_target_linears,
    merge_fura,
    print_trainable_parameters,
)
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from .qlayer import QFusedBTTLinear
from .svd_baseline import SVDLinear, convert_to_svd, merge_svd
from .training import normalize_trainable_cores_

try:
    __version__ = version("fura-kernels")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BlockShape",
    "ConversionReport",
    "DenseCore",
    "FuRAConfig",
    "FuRALinearFunction",
    "FusedBTTLinear",
    "NF4Core",
    "NF4Tensor",
    "QFusedBTTLinear",
    "SVDLinear",
    "closest_factor_pair",
    "convert_to_fura",
    "convert_to_svd",
    "count_parameters",
    "dequantize_nf4",
    "find_target_linears",
    "load_fura_adapter",
    "fura_linear",
    "merge_fura",
    "merge_svd",
    "merged_named_weights",
    "normalize_trainable_cores_",
    "print_trainable_parameters",
    "quantize_nf4",
    "reference",
    "save_fura_adapter",
    "save_merged",
    "step2_s_scaled_bmm",
]


class _WithoutBitsandbytesHubKernelNotice(logging.Filter):
    """bitsandbytes (imported by PEFT, which transformers' trainer imports) logs on every import
    on a CPU with AVX512-BF16 that it could not fetch an optional Hub kernel for its 4-bit CPU
    GEMM. Nothing here uses that kernel (its own fallback serves QLoRA baselines on a CPU), and
    the line made every command, `--method fura` included, look broken: drop that one notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutBitsandbytesHubKernelNotice())
