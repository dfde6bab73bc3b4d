"""From a dense weight to FuRA cores: block shapes, rank, which core trains, and the SVD.

Everything here follows FURA_SPEC.md §1 and §6 and runs on whatever device the weight is on
(the CPU included; the reference implementation needed CUDA). Layouts are the ones documented
in `fura_kernels.reference`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import FuRAConfig

# Module-name endings of attention projections, for `factorize_by_head`: Llama/Qwen/Mistral
# style names and BERT style names (MiniLM), so both families get head-aligned blocks.
_QUERY_NAMES = ("q_proj", "query")
_KV_NAMES = ("k_proj", "v_proj", "key", "value")
_ATTN_OUT_NAMES = ("o_proj", "attention.output.dense")


def closest_factor_pair(d: int) -> tuple[int, int]:
    """The divisor pair `(p, q)`, `p <= q`, `p*q = d`, with the smallest `q - p`."""
    if d < 1:
        raise ValueError(f"closest_factor_pair: expected a positive int, got {d}")
    p = math.isqrt(d)
    while d % p:
        p -= 1
    return p, d // p


@dataclass(frozen=True)
class BlockShape:
    """An `m x n` grid of `a x b` blocks, each of rank `r`."""

    m: int
    n: int
    a: int
    b: int
    r: int

    @property
    def out_features(self) -> int:
        return self.m * self.a

    @property
    def in_features(self) -> int:
        return self.n * self.b

    @property
    def l_numel(self) -> int:
        return self.m * self.n * self.r * self.a

    @property
    def r_numel(self) -> int:
        return self.n * self.b * self.m * self.r

    @property
    def s_numel(self) -> int:
        return self.m * self.n * self.r


@dataclass(frozen=True)
class CoreRoles:
    """Which tensors train, and where `S` lives (as a power of S folded into each core)."""

    train_l: bool
    train_r: bool
    s_separate: bool
    s_trainable: bool
    l_s_power: float
    r_s_power: float


def _head_counts(model_config: Any) -> tuple[int, int, int] | None:
    heads = getattr(model_config, "num_attention_heads", None)
    if not heads:
        return None
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return int(heads), int(kv_heads), int(head_dim)


def head_factorization(
    module_name: str | None, model_config: Any
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """`(input_pair, output_pair)` that cut an attention projection at head boundaries, or Nones."""
    if module_name is None or model_config is None:
        return None, None
    counts = _head_counts(model_config)
    if counts is None:
        return None, None
    heads, kv_heads, head_dim = counts

    def ends(names: tuple[str, ...]) -> bool:
        return any(module_name == name or module_name.endswith("." + name) for name in names)

    if ends(_QUERY_NAMES):
        return None, (heads, head_dim)
    if ends(_KV_NAMES):
        return None, (kv_heads, head_dim)
    if ends(_ATTN_OUT_NAMES):
        return (heads, head_dim), None
    return None, None


def resolve_rank(config: FuRAConfig, m: int, n: int, a: int, b: int, where: str) -> int:
    """The per-block rank `r` for a `m x n` grid of `a x b` blocks (FURA_SPEC.md §1)."""
    full = min(a, b)
    rank = config.rank
    if rank == "full":
        return full
    if isinstance(rank, int):
        if rank > full:
            raise ValueError(
                f"{where}: rank={rank} exceeds min(a, b) = min({a}, {b}) = {full} for blocks of {a}x{b}; "
                "a larger rank would only pad zeros"
            )
        return rank
    target = rank * (m * a) * (n * b)
    per_rank = m * n * (a + b)
    best = min(range(1, full + 1), key=lambda r: (abs(r * per_rank - target), r))
    return best


def resolve_block_shape(
    in_features: int,
    out_features: int,
    config: FuRAConfig,
    module_name: str | None = None,
    model_config: Any = None,
) -> BlockShape:
    """Block grid and rank for one layer. Explicit overrides beat head factorisation, which
    beats `closest_factor_pair`; `decomp_mode` decides which sides are split at all."""
    where = f"FuRA layer {module_name!r}" if module_name else "FuRA layer"
    head_in, head_out = (None, None)
    if config.factorize_by_head:
        head_in, head_out = head_factorization(module_name, model_config)

    def side(dim: int, split: bool, explicit: tuple[int, int] | None, by_head: tuple[int, int] | None, label: str):
        if not split:
            return 1, dim
        pair = explicit or by_head or closest_factor_pair(dim)
        if pair[0] * pair[1] != dim:
            source = "config" if explicit else "the model config's head counts"
            raise ValueError(
                f"{where}: {label}={pair} from {source} does not factor {dim} ({pair[0]}*{pair[1]} != {dim})"
            )
        return pair

    mode = config.decomp_mode_for(module_name)
    split_in = mode in ("output_one_block", "square")
    split_out = mode in ("input_one_block", "square")
    n, b = side(in_features, split_in, config.input_factorization, head_in, "input_factorization")
    m, a = side(out_features, split_out, config.output_factorization, head_out, "output_factorization")
    r = resolve_rank(config, m, n, a, b, where)
    return BlockShape(m=m, n=n, a=a, b=b, r=r)


def resolve_roles(shape: BlockShape, config: FuRAConfig) -> CoreRoles:
    """Which core trains (`train_position`, ties to L) and where S goes (`s_merged_to`)."""
    l_is_small = shape.l_numel <= shape.r_numel
    if config.train_position == "both":
        train_l = train_r = True
    elif config.train_position == "small":
        train_l, train_r = l_is_small, not l_is_small
    else:
        train_l = shape.l_numel >= shape.r_numel
        train_r = not train_l
    where = config.s_merged_to
    if where == "frozen":
        where = "output" if not train_l else "input"
    elif where == "trainable":
        where = "output" if train_l else "input"
    powers = {"output": (1.0, 0.0), "input": (0.0, 1.0), "split": (0.5, 0.5)}
    l_pow, r_pow = powers.get(where, (0.0, 0.0))
    separate = where in ("keep_trainable", "keep_frozen")
    return CoreRoles(
        train_l=train_l,
        train_r=train_r,
        s_separate=separate,
        s_trainable=where == "keep_trainable",
        l_s_power=l_pow,
        r_s_power=r_pow,
    )


def canonicalize_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the SVD's sign freedom: the largest-magnitude entry of each U column is positive,
    and the matching Vh row flips with it (FURA_SPEC.md §6). `u`: (..., a, k), `vh`: (..., k, b)."""
    idx = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(u, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, vh * sign.transpose(-1, -2)


def block_svd(
    weight: torch.Tensor, shape: BlockShape, svd_dtype: torch.dtype = torch.float32, block_batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign-canonical thin SVD of every block, truncated to `shape.r`, on the weight's device.

    Returns U (m, n, a, r), S (m, n, r), Vh (m, n, r, b) in `svd_dtype`. Blocks go through
    `torch.linalg.svd` in batches of `block_batch` (all at once by default).
    """
    m, n, a, b, r = shape.m, shape.n, shape.a, shape.b, shape.r
    blocks = weight.detach().to(svd_dtype).reshape(m, a, n, b).permute(0, 2, 1, 3).reshape(m * n, a, b)
    step = block_batch or m * n
    us, ss, vhs = [], [], []
    for start in range(0, m * n, step):
        u, s, vh = torch.linalg.svd(blocks[start : start + step], full_matrices=False)
        u, vh = canonicalize_signs(u[..., :r], vh[..., :r, :])
        us.append(u)
        ss.append(s[..., :r])
        vhs.append(vh)
    return (
        torch.cat(us).reshape(m, n, a, r),
        torch.cat(ss).reshape(m, n, r),
        torch.cat(vhs).reshape(m, n, r, b),
    )


def block_qr(
    weight: torch.Tensor, shape: BlockShape, dtype: torch.dtype = torch.float32, block_batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QR of every block, in the same `(U, S, Vh)` form as `block_svd`: U = Q (orthonormal
    columns), S = ones, Vh = R. Signs are canonical: R's diagonal is non-negative, which makes
    the factorisation unique for full-rank blocks. Only full rank (`shape.r = min(a, b)`)."""
    m, n, a, b, r = shape.m, shape.n, shape.a, shape.b, shape.r
    if r != min(a, b):
        raise ValueError(f"block_qr: QR blocks are full rank, got r={r} for {a}x{b} blocks")
    blocks = weight.detach().to(dtype).reshape(m, a, n, b).permute(0, 2, 1, 3).reshape(m * n, a, b)
    step = block_batch or m * n
    qs, rs = [], []
    for start in range(0, m * n, step):
        q, rr = torch.linalg.qr(blocks[start : start + step], mode="reduced")
        sign = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-1)
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        qs.append(q * sign.transpose(-1, -2))
        rs.append(rr * sign)
    ones = torch.ones(m, n, r, dtype=dtype, device=weight.device)
    return torch.cat(qs).reshape(m, n, a, r), ones, torch.cat(rs).reshape(m, n, r, b)


def cores_from_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, roles: CoreRoles
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Lay U, S, Vh out as `(btt_l, btt_r, btt_s)` (layout in `fura_kernels.reference`),
    folding `S**l_s_power` into L and `S**r_s_power` into R; `btt_s` is None unless kept apart."""
    m, n, a, r = u.shape
    b = vh.shape[-1]
    if roles.l_s_power:
        u = u * s.pow(roles.l_s_power).unsqueeze(-2)
    if roles.r_s_power:
        vh = vh * s.pow(roles.r_s_power).unsqueeze(-1)
    btt_l = u.permute(0, 1, 3, 2).reshape(m, n * r, a)
    btt_r = vh.permute(1, 3, 0, 2).reshape(n, b, m * r)
    return btt_l, btt_r, (s if roles.s_separate else None)


# A fingerprint hashes this many strided entries of a weight: cheap even at 8B parameters, and
# any checkpoint that differs in more than a sliver of its entries changes it.
FINGERPRINT_SAMPLES = 4096
# Singular values closer than this (relative to the block's largest) leave the SVD basis free
# to rotate within their subspace, so a re-decomposition need not reproduce it.
DEGENERATE_GAP = 1e-6


def _fingerprint_sample(weight: torch.Tensor) -> torch.Tensor:
    """The FINGERPRINT_SAMPLES strided entries of a weight that a fingerprint hashes, on the CPU."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    return flat[::step][:FINGERPRINT_SAMPLES].contiguous().cpu()


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of a weight's shape and a strided sample of its values rounded to bfloat16.

    It identifies a base by its values, not its storage: the same checkpoint loaded as fp32,
    fp64 or bf16 (lossless casts, or the one rounding to bf16) gives one fingerprint, and any
    other checkpoint, a fine-tuned one included, changes the rounding of most sampled entries.
    Device-independent (round-to-nearest-even everywhere)."""
    sample = _fingerprint_sample(weight).to(torch.bfloat16)
    digest = hashlib.sha256(f"{tuple(weight.shape)}|bf16-values|".encode())
    digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def legacy_weight_fingerprint(weight: torch.Tensor) -> str:
    """The fingerprint of adapter format 2: shape, dtype and raw bits (so dtype-sensitive)."""
    digest = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    digest.update(_fingerprint_sample(weight).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def degenerate_block_count(s: torch.Tensor) -> int:
    """Blocks (over the leading dims of S, values sorted descending) with a repeated or zero
    singular value."""
    s = s.float()
    scale = s[..., :1].clamp(min=1e-30)
    repeated = ((s[..., :-1] - s[..., 1:]) / scale < DEGENERATE_GAP).any(dim=-1)
    zero = (s[..., -1] / scale[..., 0]) < DEGENERATE_GAP
    return int((repeated | zero).sum().item())


def qfura_layout_problem(shape: BlockShape, roles: CoreRoles, config: FuRAConfig) -> str | None:
    """Why a layer cannot be QFuRA (a frozen L in NF4, default layout), or None if it can.

    Pure shape arithmetic, so `convert_to_fura` asks it for every layer before any SVD."""
    if shape.m != 1:
        return (
            f"QFuRA stores a frozen L core in the default layout (one output block), but "
            f"decomp_mode={config.decomp_mode!r} gives this layer m={shape.m} output blocks; use "
            "decomp_mode='output_one_block'"
        )
    if not roles.train_l:
        return None
    if config.train_position != "small":
        return f"train_position={config.train_position!r} trains L, which QFuRA keeps frozen in NF4; use 'small'"
    why = f"out_features={shape.out_features} <= b={shape.b}"
    if shape.n == 1:
        why += f" (in_features={shape.in_features} is one input block: it has no divisor pair closer than 1 x itself)"
    return (
        f"{why}, so L ({shape.l_numel:,} values) is not larger than R ({shape.r_numel:,}) and "
        "train_position='small' trains L (ties go to L), but QFuRA keeps L frozen in NF4; leave this layer out "
        "(exclude_modules) or give it more input blocks with input_factorization"
    )


def frozen_l_from_weight(
    weight: torch.Tensor, btt_r: torch.Tensor, btt_s: torch.Tensor | None, shape: BlockShape
) -> torch.Tensor:
    """The L core (m, n*r, a) that turns the decomposition-time `btt_r` (and `btt_s`) back into
    `weight`: per block, `L_ij = W_ij · pinv(diag(S_ij) · R_ij^T)`, in float64.

    For the weight they were decomposed from this is that decomposition's L (to rounding). For
    the same weights rounded to another dtype it is the L that makes the model exactly
    `W_rounded · pinv(M) · M_trained`, the trained model on that base, to that base's own
    rounding: no second SVD, so no basis that could come out flipped or rotated."""
    m, n, a, b, r = (getattr(shape, k) for k in "mnabr")
    blocks = weight.detach().double().reshape(m, a, n, b).permute(0, 2, 1, 3)  # (m, n, a, b)
    right = btt_r.detach().double().to(blocks.device).reshape(n, b, m, r).permute(2, 0, 3, 1)  # (m, n, r, b)
    if btt_s is not None:
        right = right * btt_s.detach().double().to(blocks.device).unsqueeze(-1)
    left = blocks @ torch.linalg.pinv(right)  # (m, n, a, r)
    return left.permute(0, 1, 3, 2).reshape(m, n * r, a)
