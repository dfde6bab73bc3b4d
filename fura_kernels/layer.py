"""`FusedBTTLinear`: a drop-in `nn.Linear` whose weight is `L · diag(S) · R`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import reference
from .autograd import fura_linear
from .config import FuRAConfig
from .factorization import (
    BlockShape,
    CoreRoles,
    block_qr,
    block_svd,
    cores_from_svd,
    degenerate_block_count,
    resolve_block_shape,
    resolve_roles,
    weight_fingerprint,
)


class FusedBTTLinear(nn.Module):
    """`y = x · (L · diag(S) · R)^T + bias`, trained through the minimal fused Function.

    Build it from a trained layer with `FusedBTTLinear.from_linear(linear)`: at init
    `dense_weight()` equals `linear.weight` (to fp32 SVD rounding at full rank). Parameters:

    - `btt_l` (m, n*r, a) and `btt_r` (n, b, m*r): the cores (layout in
      `fura_kernels.reference`); the trained one(s) in `config.trainable_dtype`, a frozen one in
      the original linear's dtype, both as `nn.Parameter` so `.to()`, `state_dict()` and
      sharding see them;
    - `btt_s` (m, n, r): the singular values when `s_merged_to` keeps them apart, else None;
    - `bias`: as on `nn.Linear`.

    Compute runs in the input's dtype (or autocast's, inside an autocast region).
    """

    _dense_l = True  # whether btt_l holds real values (QFusedBTTLinear stores L in NF4)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: FuRAConfig | None = None,
        *,
        module_name: str | None = None,
        model_config: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """An uninitialised layer of the right shapes (fill it with `from_linear` or a state dict).

        `dtype` is the original linear's dtype: the storage of a frozen core.
        """
        super().__init__()
        self.config = config if config is not None else FuRAConfig()
        self.in_features = in_features
        self.out_features = out_features
        self.module_name = module_name
        self.base_dtype = dtype or torch.get_default_dtype()
        # Set by from_linear, read by fura_kernels.adapters. Buffers, not attributes, so that they
        # travel with state dicts (a model materialised from meta under FSDP gets them too).
        self.register_buffer("fingerprint_sha256", torch.zeros(32, dtype=torch.uint8, device=device))
        self.register_buffer("degenerate_block_count", torch.zeros((), dtype=torch.int64, device=device))
        self.block_shape: BlockShape = resolve_block_shape(
            in_features, out_features, self.config, module_name, model_config
        )
        self.roles: CoreRoles = resolve_roles(self.block_shape, self.config)
        m, n, a, b, r = (getattr(self.block_shape, f) for f in "mnabr")
        train_dtype = self.config.trainable_dtype

        def param(shape, trainable: bool, storage: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=device, dtype=storage), requires_grad=trainable)

        roles = self.roles
        # A subclass that stores L another way (QFuRA: NF4) builds no dense L at all.
        l_device = "meta" if not self._dense_l else device
        self.btt_l = nn.Parameter(
            torch.empty((m, n * r, a), device=l_device, dtype=train_dtype if roles.train_l else self.base_dtype),
            requires_grad=roles.train_l,
        )
        self.btt_r = param((n, b, m * r), roles.train_r, train_dtype if roles.train_r else self.base_dtype)
        if roles.s_separate:
            # S is tiny; it stays in the trainable dtype even when frozen, so no precision is lost.
            self.btt_s = param((m, n, r), roles.s_trainable, train_dtype)
        else:
            self.register_parameter("btt_s", None)
        if bias:
            train_bias = self.config.train_bias
            self.bias = param((out_features,), train_bias, train_dtype if train_bias else self.base_dtype)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: FuRAConfig | None = None,
        *,
        module_name: str | None = None,
        model_config: Any = None,
        **overrides: Any,
    ) -> FusedBTTLinear:
        """Factorise `linear` (per-block SVD on its own device). `overrides` replace config fields.

        A `linear` on the `meta` device gives a correctly shaped layer without values.
        """
        if not isinstance(linear, nn.Linear):
            where = f" for {module_name!r}" if module_name else ""
            raise TypeError(f"FusedBTTLinear.from_linear{where}: expected an nn.Linear, got {type(linear).__name__}")
        config = config if config is not None else FuRAConfig()
        if overrides:
            config = config.replace(**overrides)
        weight = linear.weight
        if not weight.dtype.is_floating_point:
            raise TypeError(
                f"FusedBTTLinear.from_linear for {module_name or 'layer'}: weight dtype {weight.dtype} is not "
                "floating point (quantised linears are not supported here)"
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            config=config,
            module_name=module_name,
            model_config=model_config,
            device=weight.device,
            dtype=weight.dtype,
        )
        if weight.device.type == "meta":
            return layer
        if not torch.isfinite(weight).all():
            raise ValueError(f"{layer._where}.from_linear: the weight holds NaN or inf values; cannot factorise it")
        decompose = block_svd if config.init == "svd" else block_qr
        u, s, vh = decompose(weight, layer.block_shape, config.svd_dtype, config.svd_block_batch)
        # What an adapter file needs to find this base again and to trust a re-decomposition.
        layer.base_fingerprint = weight_fingerprint(weight)
        layer.degenerate_blocks = degenerate_block_count(s) if config.init == "svd" else 0
        btt_l, btt_r, btt_s = cores_from_svd(u, s, vh, layer.roles)
        with torch.no_grad():
            layer.btt_l.copy_(btt_l)
            layer.btt_r.copy_(btt_r)
            if layer.btt_s is not None:
                layer.btt_s.copy_(btt_s)
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def base_fingerprint(self) -> str | None:
        """sha256 (hex) of the base weight this layer was decomposed from; None if never set."""
        digest = self.fingerprint_sha256
        if digest.device.type == "meta" or not bool(digest.any()):
            return None
        return bytes(digest.cpu().tolist()).hex()

    @base_fingerprint.setter
    def base_fingerprint(self, hexdigest: str | None) -> None:
        value = bytes.fromhex(hexdigest) if hexdigest else bytes(32)
        with torch.no_grad():
            self.fingerprint_sha256.copy_(torch.tensor(list(value), dtype=torch.uint8))

    @property
    def degenerate_blocks(self) -> int:
        """Blocks whose SVD had repeated or zero singular values (their basis is not unique)."""
        count = self.degenerate_block_count
        return 0 if count.device.type == "meta" else int(count.item())

    @degenerate_blocks.setter
    def degenerate_blocks(self, count: int) -> None:
        with torch.no_grad():
            self.degenerate_block_count.fill_(count)

    @property
    def device(self) -> torch.device:
        """Where the layer's parameters live (R always holds real values)."""
        return self.btt_r.device

    @property
    def _where(self) -> str:
        name = type(self).__name__
        return f"{name} {self.module_name!r}" if self.module_name else name

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._where}: expected a torch.Tensor input, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(
                f"{self._where}: input dtype {x.dtype} is not floating point; expected float32, float16 or bfloat16"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._where}: input of shape {tuple(x.shape)} has last dimension "
                f"{x.shape[-1] if x.dim() else None}; expected in_features={self.in_features}"
            )
        if x.device != self.device:
            raise ValueError(f"{self._where}: input is on {x.device} but the layer's parameters are on {self.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        return fura_linear(x, self.btt_l, self.btt_r, self.btt_s, self.bias)

    def _merge_dtype(self) -> torch.dtype:
        params = [p for p in (self.btt_l, self.btt_r, self.btt_s) if p is not None]
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def dense_weight(self) -> torch.Tensor:
        """The dense `out x in` weight, differentiable, in the cores' promoted dtype."""
        dtype = self._merge_dtype()
        s = self.btt_s.to(dtype) if self.btt_s is not None else None
        return reference.dense_weight(self.btt_l.to(dtype), self.btt_r.to(dtype), s)

    def _storage_dtype(self) -> torch.dtype:
        """The dtype a merged layer is stored in: the frozen core's, or the original's."""
        for core, trained in ((self.btt_l, self.roles.train_l), (self.btt_r, self.roles.train_r)):
            if not trained:
                return core.dtype
        return self.base_dtype

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` with the merged weight, on the layer's device, in its storage dtype."""
        dtype = self._storage_dtype()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.device, dtype=dtype
        )
        linear.weight.copy_(self.dense_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        shape, roles = self.block_shape, self.roles
        trained = [name for name, on in (("L", roles.train_l), ("R", roles.train_r), ("S", roles.s_trainable)) if on]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocks=(m={shape.m}, n={shape.n}, a={shape.a}, b={shape.b}, r={shape.r}), "
            f"mode={self.config.decomp_mode}, trains={'+'.join(trained) or 'nothing'}, "
            f"s_merged_to={self.config.s_merged_to}"
        )
