"""The paper's SVD reparameterisation baseline and its random-basis ablation.

The FuRA reference (`fura/svd_layer.py`) controls for "why a block-wise, pretrained basis" with a
plain, whole-matrix SVD of each linear weight, `W = A · diag(s) · B` with `A = U`, `B = Vh` (`s`
folded into one side or kept apart), one side trained. Its ablation (`FURA_SVD_RANDOM_U=1`)
replaces the pretrained left basis `U` by a random orthogonal matrix `Q` and refits the right
factor, `B = Q^T W`, with `s = 1`: the same trainable count, no pretrained basis. `Q Q^T W = W`
when `out <= in`; for a tall weight (`out > in`) it is the projection of `W` onto `Q`'s columns,
so the ablation starts from a different model there (as in the reference; `fit_relative_error`
says how far).

Differences from the reference, none of which change the function it trains: the SVD runs on
whatever device the weight is on (the reference needed CUDA), in `svd_dtype`; trained factors are
stored in `trainable_dtype` (fp32 by default; the reference kept the model's dtype); the forward is
`(x · B'^T) · A'^T` on the two factors, never the `out x in` product.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import count_parameters, find_target_linears, split_name

TRAIN_POSITIONS = ("output", "input", "both")
S_MERGED_TO = ("frozen", "trainable", "output", "input", "split", "keep_frozen", "keep_trainable")


def resolve_svd_s_merged_to(train_position: str, s_merged_to: str | None = None) -> str:
    """Where the singular values go, as the reference resolves it: `output` (into A), `input` (into
    B), `split` (sqrt into each) or `keep_frozen` / `keep_trainable` (a separate vector). By default
    (and for `frozen`) they join the frozen factor; `trainable` puts them in the trained one;
    training both factors splits them unless they are kept apart."""
    if train_position not in TRAIN_POSITIONS:
        raise ValueError(f"SVD baseline: train_position must be one of {TRAIN_POSITIONS}, got {train_position!r}")
    where = "frozen" if s_merged_to is None else s_merged_to
    if where not in S_MERGED_TO:
        raise ValueError(f"SVD baseline: s_merged_to must be one of {S_MERGED_TO} or None, got {s_merged_to!r}")
    if where in ("output", "input", "split", "keep_frozen", "keep_trainable"):
        return where
    if train_position == "both":
        return "split"
    if where == "trainable":
        return train_position
    return "input" if train_position == "output" else "output"


class SVDLinear(nn.Module):
    """`y = x · (A · diag(s) · B)^T + bias`: A (out, rank), B (rank, in), s (rank) or None.

    Built by `from_linear`; `train_position` says which factor trains (`configure_svd_trainability`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        keep_s: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = min(in_features, out_features)
        kwargs = {"device": device, "dtype": dtype}
        self.svd_a = nn.Parameter(torch.empty(out_features, self.rank, **kwargs))
        self.svd_b = nn.Parameter(torch.empty(self.rank, in_features, **kwargs))
        self.svd_s = nn.Parameter(torch.ones(self.rank, **kwargs)) if keep_s else None
        self.bias = nn.Parameter(torch.zeros(out_features, **kwargs)) if bias else None
        self.s_merged_to: str | None = None
        self.base_dtype = dtype or torch.get_default_dtype()  # the original weight's dtype: merges go back to it
        self.random_basis = False
        self.fit_relative_error = 0.0  # ||A diag(s) B - W|| / ||W|| at conversion (non-zero: a tall random basis)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        train_position: str = "output",
        s_merged_to: str | None = None,
        *,
        random_basis: bool = False,
        generator: torch.Generator | None = None,
        svd_dtype: torch.dtype = torch.float32,
        trainable_dtype: torch.dtype = torch.float32,
    ) -> SVDLinear:
        """The SVD layer equal to `linear` (to `svd_dtype` rounding), or with `random_basis` the
        reference's ablation: `A = Q` (a random orthogonal `out x rank` matrix from `generator`,
        on the CPU so a seed gives the same basis on every device), `B = Q^T W`, `s = 1`."""
        where = resolve_svd_s_merged_to(train_position, s_merged_to)
        weight = linear.weight.detach()
        if not weight.dtype.is_floating_point:
            raise TypeError(f"SVD baseline: weight dtype {weight.dtype} is not floating point")
        w = weight.to(svd_dtype)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        s = s.clamp(min=0)
        if random_basis:
            gaussian = torch.randn(u.shape, generator=generator, dtype=svd_dtype).to(w.device)
            u, _ = torch.linalg.qr(gaussian, mode="reduced")
            vh = u.T @ w  # the best fit of W within span(Q)
            s = torch.ones_like(s)
        keep = where in ("keep_frozen", "keep_trainable")
        power_a = {"output": 1.0, "split": 0.5}.get(where, 0.0)
        power_b = {"input": 1.0, "split": 0.5}.get(where, 0.0)
        a, b = u * s.pow(power_a), s.pow(power_b).unsqueeze(1) * vh
        trains_a, trains_b = train_position in ("output", "both"), train_position in ("input", "both")
        # Built on meta: every tensor is replaced below, so nothing weight-sized is allocated twice.
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, keep_s=keep,
                    device="meta", dtype=weight.dtype)  # fmt: skip
        layer.svd_a = nn.Parameter(a.to(trainable_dtype if trains_a else weight.dtype), requires_grad=trains_a)
        layer.svd_b = nn.Parameter(b.to(trainable_dtype if trains_b else weight.dtype), requires_grad=trains_b)
        if keep:
            layer.svd_s = nn.Parameter(s.to(trainable_dtype), requires_grad=where == "keep_trainable")
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(trainable_dtype), requires_grad=True)
        layer.s_merged_to, layer.random_basis, layer.base_dtype = where, random_basis, weight.dtype
        fitted = (a * s.unsqueeze(0) if keep else a) @ b
        layer.fit_relative_error = float(torch.linalg.norm(fitted - w) / torch.linalg.norm(w).clamp(min=1e-30))
        return layer

    def dense_weight(self) -> torch.Tensor:
        """`A · diag(s) · B` (out, in) in fp32 at least, differentiable."""
        dtype = torch.promote_types(self.svd_a.dtype, torch.float32)
        a = self.svd_a.to(dtype) if self.svd_s is None else self.svd_a.to(dtype) * self.svd_s.to(dtype)
        return a @ self.svd_b.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        b = self.svd_b if self.svd_s is None else self.svd_s.unsqueeze(1) * self.svd_b
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(F.linear(x, b.to(dtype)), self.svd_a.to(dtype), bias)

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` with the merged weight (computed in fp32 at least), in the original
        weight's dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.svd_a.device, dtype=self.base_dtype)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight().detach())
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear

    def extra_repr(self) -> str:
        tensors = (("A", self.svd_a), ("B", self.svd_b), ("s", self.svd_s))
        trained = [n for n, p in tensors if p is not None and p.requires_grad]
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, s_merged_to={self.s_merged_to}, "
                f"random_basis={self.random_basis}, trains={'+'.join(trained) or 'nothing'}")  # fmt: skip


def configure_svd_trainability(
    model: nn.Module,
    train_position: str = "output",
    train_bias: bool = True,
    train_embed_lm_head: bool = False,
    train_singular_values: bool = False,
) -> dict[str, int]:
    """Freeze everything, then train each `SVDLinear`'s A (`output`), B (`input`) or both, its
    bias (`train_bias`), a kept-apart s (`train_singular_values`), and optionally the embeddings and
    LM head, as the reference's function of the same name. Returns its counts."""
    if train_position not in TRAIN_POSITIONS:
        raise ValueError(f"SVD baseline: train_position must be one of {TRAIN_POSITIONS}, got {train_position!r}")
    model.requires_grad_(False)
    counts = {"num_svd_layers": 0, "tuned_output_cores": 0, "tuned_input_cores": 0, "tuned_biases": 0}
    for module in model.modules():
        if not isinstance(module, SVDLinear):
            continue
        counts["num_svd_layers"] += 1
        if train_position in ("output", "both"):
            module.svd_a.requires_grad_(True)
            counts["tuned_output_cores"] += 1
        if train_position in ("input", "both"):
            module.svd_b.requires_grad_(True)
            counts["tuned_input_cores"] += 1
        if module.svd_s is not None:
            module.svd_s.requires_grad_(train_singular_values)
        if module.bias is not None and train_bias:
            module.bias.requires_grad_(True)
            counts["tuned_biases"] += 1
    if train_embed_lm_head:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head"):
                module.requires_grad_(True)
    counts["trainable_param_count"], counts["total_param_count"] = count_parameters(model)
    return counts


def convert_to_svd(
    model: nn.Module,
    target_modules: str | Iterable[str],
    *,
    train_position: str = "output",
    s_merged_to: str | None = None,
    random_basis: bool = False,
    seed: int = 0,
    exclude_modules: str | Iterable[str] | None = None,
    train_bias: bool = True,
    train_singular_values: bool = False,
    svd_dtype: torch.dtype = torch.float32,
    trainable_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Replace the selected `nn.Linear` layers (as `convert_to_fura` selects them) with `SVDLinear`
    and set what trains (`configure_svd_trainability`), in place. Every layer is built before any
    is swapped in, so a failure leaves the model as it was. `random_basis` is the reference's
    `FURA_SVD_RANDOM_U=1` ablation, its bases drawn from `seed` in conversion order.

    Returns the counts of `configure_svd_trainability` plus `converted` (names) and
    `max_fit_relative_error` (0 up to rounding, unless a random basis meets a tall weight)."""
    names = find_target_linears(model, target_modules, exclude_modules)
    if not names:
        raise ValueError(f"convert_to_svd: target_modules={target_modules!r} matched no convertible nn.Linear")
    generator = torch.Generator().manual_seed(seed)
    built = []
    for name in names:
        linear = model.get_submodule(name)
        layer = SVDLinear.from_linear(
            linear, train_position, s_merged_to, random_basis=random_basis, generator=generator,
            svd_dtype=svd_dtype, trainable_dtype=trainable_dtype,
        )  # fmt: skip
        built.append((name, layer))
    for name, layer in built:
        parent, attr = split_name(model, name)
        setattr(parent, attr, layer)
    counts = configure_svd_trainability(model, train_position, train_bias, False, train_singular_values)
    counts["converted"] = names
    counts["max_fit_relative_error"] = max(layer.fit_relative_error for _, layer in built)
    return counts


def merge_svd(model: nn.Module) -> nn.Module:
    """Replace every `SVDLinear` in `model` with its merged `nn.Linear`, in place."""
    merged = [(name, module.to_linear()) for name, module in model.named_modules() if isinstance(module, SVDLinear)]
    for name, linear in merged:
        parent, attr = split_name(model, name)
        setattr(parent, attr, linear)
    return model
