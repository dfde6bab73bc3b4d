"""FuRAConfig: every knob of the FuRA factorisation, validated when it is built.

The defaults are the paper's (FURA_SPEC.md §1): `output_one_block`, full rank, train the
small core, a separate trainable `S`, trained biases, fp32 trainable tensors.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

DECOMP_MODES = ("output_one_block", "input_one_block", "square")
DECOMP_MODE_ALIASES = {
    "input": "input_one_block",
    "output": "output_one_block",
    "input_block": "input_one_block",
    "output_block": "output_one_block",
}
# The reference's module groups for a per-group `decomp_mode` (its RL ablations), their aliases,
# and the mode it gives a group that a mapping leaves out (`resolve_blocktt_decomp_modes`).
DECOMP_GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "mlp_upgate": ("gate_proj", "up_proj"),
    "mlp_down": ("down_proj",),
}
DECOMP_GROUP_ALIASES = {"mlp_up_gate": "mlp_upgate", "upgate": "mlp_upgate", "up_gate": "mlp_upgate"}
GROUP_DEFAULT_DECOMP_MODE = "input_one_block"
TRAIN_POSITIONS = ("small", "large", "both")
S_MERGED_TO = ("keep_trainable", "keep_frozen", "output", "input", "split", "frozen", "trainable")
SVD_DTYPES = (torch.float32, torch.float64)
INITS = ("svd", "qr")


TRAINABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _canonical_mode(mode: Any, where: str, allow_square: bool = True) -> str:
    allowed = DECOMP_MODES if allow_square else ("output_one_block", "input_one_block")
    canonical = DECOMP_MODE_ALIASES.get(mode.strip(), mode.strip()) if isinstance(mode, str) else mode
    if canonical not in allowed:
        aliases = ", ".join(f"{k!r}" for k in DECOMP_MODE_ALIASES)
        raise ValueError(f"FuRAConfig.decomp_mode{where}: expected one of {allowed} (or {aliases}), got {mode!r}")
    return canonical


def _parse_mapping(text: str) -> dict:
    """A `{group: mode}` literal as the reference's scripts write it: JSON, a Python dict, or bare
    words (`{qkv:input,o:output}`)."""
    bare = re.sub(r"(?<=[{,:])\s*([A-Za-z_]\w*)\s*(?=[,:}])", r'"\1"', text)
    for candidate in dict.fromkeys((text, bare)):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(candidate)
            except (ValueError, SyntaxError, TypeError):
                continue
            if isinstance(parsed, dict):
                return parsed
    raise ValueError(
        f"FuRAConfig.decomp_mode: {text!r} is not a dictionary; write it as JSON or a Python dict, e.g. "
        '\'{"qkv": "input", "o": "output", "mlp_upgate": "output", "mlp_down": "output"}\''
    )


def _as_decomp_mode(value: Any) -> str | dict[str, str]:
    """A mode name (aliases resolved), or a per-group mapping (a dict, or its literal as a string)
    with every group filled in: groups a mapping leaves out get GROUP_DEFAULT_DECOMP_MODE, as in the
    reference. Per-group modes are one-block modes only, as in the reference."""
    if isinstance(value, str) and value.strip().startswith("{"):
        value = _parse_mapping(value.strip())
    if not isinstance(value, dict):
        return _canonical_mode(value, "")
    groups = {}
    for key, mode in value.items():
        group = DECOMP_GROUP_ALIASES.get(key.strip(), key.strip()) if isinstance(key, str) else key
        if group not in DECOMP_GROUPS:
            raise ValueError(
                f"FuRAConfig.decomp_mode: unknown group {key!r}; expected one of {tuple(DECOMP_GROUPS)} "
                f"(aliases {tuple(DECOMP_GROUP_ALIASES)})"
            )
        groups[group] = _canonical_mode(mode, f"[{key!r}]", allow_square=False)
    return {group: groups.get(group, GROUP_DEFAULT_DECOMP_MODE) for group in DECOMP_GROUPS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_dtype(value: Any, field_name: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise TypeError(f"FuRAConfig.{field_name}: expected a torch.dtype or its name, got {value!r}")


def _as_factor_pair(value: Any, field_name: str) -> tuple[int, int] | None:
    """A pair of ints from a tuple or list (JSON gives lists); a string, floats or bools are
    refused rather than read digit by digit or truncated."""
    if value is None:
        return None
    if not isinstance(value, tuple | list) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise TypeError(f"FuRAConfig.{field_name}: expected a pair (num_blocks, block_size) of ints, got {value!r}")
    blocks, size = (int(v) for v in value)
    if blocks < 1 or size < 1:
        raise ValueError(f"FuRAConfig.{field_name}: both factors must be >= 1, got {value!r}")
    return blocks, size


@dataclass(frozen=True)
class FuRAConfig:
    """How each `nn.Linear` is factorised into `L · diag(S) · R` and which parts train.

    Frozen: every field is validated once, when the config is built; change one with
    `config.replace(field=value)`, which validates the copy again."""

    decomp_mode: str | dict[str, str] = field(
        default="output_one_block",
        metadata={
            "help": "Block grid of W (out x in). 'output_one_block' (paper default): one block "
            "row, the input split into closest_factor_pair(in) blocks; 'input_one_block': the "
            "mirror image; 'square': both sides split (not parameter-efficient). Aliases 'output', "
            "'input'. Or one mode per module group, as the reference's RL ablations: a dict (or its "
            "JSON / dict literal) over 'qkv' (q/k/v_proj), 'o' (o_proj), 'mlp_upgate' (gate/up_proj; "
            "aliases 'upgate', 'up_gate', 'mlp_up_gate') and 'mlp_down' (down_proj) of one-block modes; "
            "a group left out gets 'input_one_block', as in the reference, and a layer in no group is "
            "refused when it is converted."
        },
    )
    rank: str | int | float = field(
        default="full",
        metadata={
            "help": "Per-block SVD rank: 'full' (min(a, b), lossless), an int (truncated SVD, at "
            "most min(a, b)), or a float in (0, 1): the rank whose parameter count "
            "m*n*r*(a+b) is closest to that fraction of in*out, at least 1."
        },
    )
    train_position: str = field(
        default="small",
        metadata={
            "help": "Which core trains: 'small' (fewer entries, default), 'large', or 'both'. "
            "On a tie the L core is the one chosen."
        },
    )
    s_merged_to: str = field(
        default="keep_trainable",
        metadata={
            "help": "Where the singular values live: 'keep_trainable' (a separate trained S, "
            "default), 'keep_frozen' (separate, frozen), 'output' (U·S in L), 'input' (S·Vh in "
            "R), 'split' (sqrt(S) in each), 'frozen' / 'trainable' (merged into the frozen / "
            "trained core; invalid with train_position='both')."
        },
    )
    init: str = field(
        default="svd",
        metadata={
            "help": "How each block is split: 'svd' (U · diag(S) · Vh, the method) or 'qr' (Q · R with a "
            "positive diagonal; no singular values, so s_merged_to='keep_*' is invalid and rank must be 'full')."
        },
    )
    input_factorization: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Explicit (n, b) for the input side, n*b = in_features. Applies to every "
            "converted layer, so use it for one layer shape at a time. Not with "
            "'input_one_block', which fixes n = 1."
        },
    )
    output_factorization: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Explicit (m, a) for the output side, m*a = out_features. Not with "
            "'output_one_block', which fixes m = 1."
        },
    )
    factorize_by_head: bool = field(
        default=True,
        metadata={
            "help": "For attention projections of a transformers model, cut the head side at "
            "head boundaries: o_proj input (num_heads, head_dim), q_proj output (num_heads, "
            "head_dim), k/v_proj output (num_kv_heads, head_dim). Only sides that decomp_mode "
            "splits are affected. The reference's launchers turn it on."
        },
    )
    svd_dtype: torch.dtype = field(
        default=torch.float32,
        metadata={
            "help": "Precision of the SVD (or QR), whatever the weight's dtype: float32 or float64 "
            "(bf16 cores are not lossless, FURA_SPEC.md §6)."
        },
    )
    svd_block_batch: int | None = field(
        default=None,
        metadata={
            "help": "How many blocks one batched SVD call takes (bounds the SVD's workspace); "
            "None takes all blocks of a layer at once. Results do not depend on it."
        },
    )
    train_bias: bool = field(default=True, metadata={"help": "Train the layer's bias, if it has one."})
    trainable_dtype: torch.dtype = field(
        default=torch.float32,
        metadata={
            "help": "Storage dtype of the trained tensors (cores, S, bias). fp32 by default: "
            "bf16 trainables freeze under AdamW (FURA_SPEC.md §6). Compute runs in the "
            "input's dtype."
        },
    )

    def __post_init__(self) -> None:
        for name in ("train_bias", "factorize_by_head"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FuRAConfig.{name}: expected True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "decomp_mode", _as_decomp_mode(self.decomp_mode))
        if self.train_position not in TRAIN_POSITIONS:
            raise ValueError(
                f"FuRAConfig.train_position: expected one of {TRAIN_POSITIONS}, got {self.train_position!r}"
            )
        if self.s_merged_to not in S_MERGED_TO:
            raise ValueError(f"FuRAConfig.s_merged_to: expected one of {S_MERGED_TO}, got {self.s_merged_to!r}")
        if self.train_position == "both" and self.s_merged_to in ("frozen", "trainable"):
            raise ValueError(
                f"FuRAConfig.s_merged_to={self.s_merged_to!r} names the frozen/trained core, but "
                "train_position='both' trains both cores; use 'output', 'input', 'split' or 'keep_*'"
            )
        self._validate_rank()
        if self.init not in INITS:
            raise ValueError(f"FuRAConfig.init: expected one of {INITS}, got {self.init!r}")
        if self.init == "qr" and self.s_merged_to.startswith("keep_"):
            raise ValueError(
                f"FuRAConfig.s_merged_to={self.s_merged_to!r} keeps singular values apart, but init='qr' "
                "has none; use init='svd' or s_merged_to='output'"
            )
        if self.init == "qr" and self.rank != "full":
            raise ValueError(
                f"FuRAConfig.rank={self.rank!r} with init='qr': a truncated QR is not a best low-rank "
                "approximation; use rank='full' or init='svd'"
            )
        # Normalised values are written through object.__setattr__: the dataclass is frozen.
        _set = object.__setattr__
        _set(self, "input_factorization", _as_factor_pair(self.input_factorization, "input_factorization"))
        _set(self, "output_factorization", _as_factor_pair(self.output_factorization, "output_factorization"))
        if "input_one_block" in self._modes() and self.input_factorization is not None:
            raise ValueError(
                f"FuRAConfig.input_factorization={self.input_factorization} conflicts with "
                "decomp_mode='input_one_block', which keeps the input side as one block; use 'square'"
            )
        if "output_one_block" in self._modes() and self.output_factorization is not None:
            raise ValueError(
                f"FuRAConfig.output_factorization={self.output_factorization} conflicts with "
                "decomp_mode='output_one_block', which keeps the output side as one block; use 'square'"
            )
        _set(self, "svd_dtype", _as_dtype(self.svd_dtype, "svd_dtype"))
        if self.svd_dtype not in SVD_DTYPES:
            raise ValueError(f"FuRAConfig.svd_dtype: expected torch.float32 or torch.float64, got {self.svd_dtype}")
        _set(self, "trainable_dtype", _as_dtype(self.trainable_dtype, "trainable_dtype"))
        if self.trainable_dtype not in TRAINABLE_DTYPES:
            raise ValueError(
                f"FuRAConfig.trainable_dtype: expected one of {TRAINABLE_DTYPES} (AdamW needs a dtype it can step), "
                f"got {self.trainable_dtype}"
            )
        if self.svd_block_batch is not None and (
            isinstance(self.svd_block_batch, bool)
            or not isinstance(self.svd_block_batch, int)
            or self.svd_block_batch < 1
        ):
            raise ValueError(
                f"FuRAConfig.svd_block_batch: expected a positive int or None, got {self.svd_block_batch!r}"
            )

    def _modes(self) -> tuple[str, ...]:
        return tuple(self.decomp_mode.values()) if isinstance(self.decomp_mode, dict) else (self.decomp_mode,)

    def decomp_mode_for(self, module_name: str | None) -> str:
        """The decomposition mode of the layer called `module_name` (its last dotted part picks
        the group of a per-group `decomp_mode`)."""
        if not isinstance(self.decomp_mode, dict):
            return self.decomp_mode
        leaf = module_name.rsplit(".", 1)[-1] if module_name else None
        for group, leaves in DECOMP_GROUPS.items():
            if leaf in leaves:
                return self.decomp_mode[group]
        raise ValueError(
            f"FuRA layer {module_name!r}: decomp_mode gives one mode per module group {self.decomp_mode}, but "
            f"{leaf!r} is in no group (groups: { {g: list(v) for g, v in DECOMP_GROUPS.items()} }); leave the "
            "layer out of target_modules or give decomp_mode one mode for every layer"
        )

    def _validate_rank(self) -> None:
        rank = self.rank
        if isinstance(rank, str):
            if rank != "full":
                raise ValueError(f"FuRAConfig.rank: expected 'full', an int or a float in (0, 1), got {rank!r}")
        elif isinstance(rank, bool):
            raise TypeError(f"FuRAConfig.rank: expected 'full', an int or a float in (0, 1), got {rank!r}")
        elif isinstance(rank, int):
            if rank < 1:
                raise ValueError(f"FuRAConfig.rank: an int rank must be >= 1, got {rank}")
        elif isinstance(rank, float):
            if not 0.0 < rank < 1.0:
                raise ValueError(f"FuRAConfig.rank: a float rank is a fraction in (0, 1), got {rank}")
        else:
            raise TypeError(f"FuRAConfig.rank: expected 'full', an int or a float in (0, 1), got {rank!r}")

    def replace(self, **overrides: Any) -> FuRAConfig:
        """A copy with some fields changed, validated again."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"FuRAConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (dtypes as names)."""
        out = dataclasses.asdict(self)
        if isinstance(self.decomp_mode, dict):
            out["decomp_mode"] = dict(self.decomp_mode)
        out["svd_dtype"] = str(self.svd_dtype).removeprefix("torch.")
        out["trainable_dtype"] = str(self.trainable_dtype).removeprefix("torch.")
        return out
