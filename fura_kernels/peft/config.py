"""`FuRAPeftConfig`: FuRA as a PEFT method, in the transform form (FURA_SPEC.md §11).

The fields a LoRA user knows (`target_modules`, `exclude_modules`, `modules_to_save`,
`layers_to_transform`, `task_type`) mean what they mean for `LoraConfig`; the FuRA fields are
those of `FuRAConfig` that the transform form can express, checked by building that config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig

from ..config import FuRAConfig

PEFT_TYPE = "FURA"
PREFIX = "fura_"


@dataclass
class FuRAPeftConfig(PeftConfig):
    """Configuration of a FuRA adapter for `peft.get_peft_model` (after `import fura_kernels.peft`).

    Each targeted layer keeps its base weight `W` untouched and applies
    `x'_j = x_j · T_j^T`, `T_j = V0_j^T · diag(S_j / S0_j) · R_j`, per input block `j`: the
    paper's default FuRA (`W' = L · diag(S) · R`) as an input transform. `R` and `S` train (fp32);
    `V0`, `S0` are the frozen SVD of each block of `W`, taken at `get_peft_model` time.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt, as for LoraConfig: a list of names or name suffixes, a regex matched against "
            "the whole name, or 'all-linear' (every linear/Conv1D layer except the output layer). None takes "
            "the architecture's default, as LoRA does."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules not to adapt: a list of names or suffixes, or a regex."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (as for LoraConfig)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "The name of the layer list that layers_to_transform indexes."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier)."}
    )
    decomp_mode: str = field(
        default="output_one_block",
        metadata={
            "help": "Only 'output_one_block' (the paper's default) is an input transform: with more than one output "
            "block each block row has its own U and the update is no longer W · T."
        },
    )
    rank: str | int | float = field(
        default="full",
        metadata={
            "help": "Per-block SVD rank, as in FuRAConfig: 'full', an int, or a fraction in (0, 1). A truncated rank "
            "drops the rest of each block at init (as FuRA does) and cannot be unmerged."
        },
    )
    train_position: str = field(
        default="small",
        metadata={"help": "Must resolve to training R (the input-side core); a trained L needs the L form."},
    )
    s_merged_to: str = field(
        default="keep_trainable",
        metadata={"help": "Only 'keep_trainable' (a separate trained S, the default) is supported in this form."},
    )
    input_factorization: list[int] | None = field(
        default=None, metadata={"help": "Explicit (n, b) for the input side, n * b = in_features."}
    )
    factorize_by_head: bool = field(
        default=True,
        metadata={"help": "Cut o_proj's input at head boundaries (num_heads blocks of head_dim), as FuRAConfig does."},
    )
    svd_dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the per-block SVD at init: 'float32' or 'float64', whatever the weight dtype."},
    )
    train_bias: bool = field(
        default=True,
        metadata={
            "help": "Train a bias update for every targeted layer that has a bias (kept beside the base bias, which "
            "stays as it is; merged into it by merge_and_unload)."
        },
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a progress bar while the layers are decomposed."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list | tuple | set):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple | set):
            self.exclude_modules = list(self.exclude_modules)
        if self.input_factorization is not None:
            self.input_factorization = list(self.input_factorization)
        self.fura_config()  # validates every FuRA field now, not at the first layer
        for name, expected in (("decomp_mode", "output_one_block"), ("s_merged_to", "keep_trainable")):
            if getattr(self, name) != expected:
                raise ValueError(
                    f"FuRAPeftConfig.{name}={getattr(self, name)!r}: the transform form (FURA_SPEC.md §11) supports "
                    f"only {name}={expected!r}; for other layouts convert with fura_kernels.convert_to_fura"
                )
        if self.train_position == "both":
            raise ValueError(
                "FuRAPeftConfig.train_position='both' trains the L core, which the transform form never stores; "
                "use 'small', or fura_kernels.convert_to_fura"
            )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("FuRAPeftConfig.layers_pattern is only used together with layers_to_transform")
        # Set by from_pretrained: the layers then wait for their saved tensors instead of running the SVD.
        self._awaiting_saved_tensors = False

    def fura_config(self) -> FuRAConfig:
        """The equivalent `FuRAConfig` (validated), for block shapes and roles."""
        svd_dtype = getattr(torch, str(self.svd_dtype).removeprefix("torch."), None)
        if svd_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"FuRAPeftConfig.svd_dtype: expected 'float32' or 'float64', got {self.svd_dtype!r}")
        factorization = tuple(self.input_factorization) if self.input_factorization is not None else None
        return FuRAConfig(
            decomp_mode=self.decomp_mode,
            rank=self.rank,
            train_position=self.train_position,
            s_merged_to=self.s_merged_to,
            input_factorization=factorization,
            factorize_by_head=self.factorize_by_head,
            svd_dtype=svd_dtype,
            train_bias=self.train_bias,
        )

    @classmethod
    def from_fura_config(cls, config: FuRAConfig, **peft_fields: Any) -> FuRAPeftConfig:
        """The PEFT config of a `FuRAConfig` (for `fura_to_peft`), with PEFT's own fields given."""
        return cls(
            decomp_mode=config.decomp_mode,
            rank=config.rank,
            train_position=config.train_position,
            s_merged_to=config.s_merged_to,
            input_factorization=list(config.input_factorization) if config.input_factorization else None,
            factorize_by_head=config.factorize_by_head,
            svd_dtype=str(config.svd_dtype).removeprefix("torch."),
            train_bias=config.train_bias,
            **peft_fields,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """A saved adapter's config. Its layers are built without an SVD: the saved `R`, `S`, `V0`
        and `S0` define the update on their own, and loading copies them in."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._awaiting_saved_tensors = True
        return config
