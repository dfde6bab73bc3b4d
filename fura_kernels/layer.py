"""`FusedBTTLinear`: a drop-in `nn.Linear` whose weight is `L · diag(S) · R`."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import reference
from .autograd.common import DEVICE_TYPES, device_type
from .config import FuRAConfig
from .cores import QUANT_TYPES, DenseCore, NF4Core
from .factorization import (
    BlockShape,
    CoreRoles,
    block_qr,
    block_svd,
    cores_from_svd,
    degenerate_block_count,
    qfura_layout_problem,
    resolve_block_shape,
    resolve_roles,
    weight_fingerprint,
)


class FusedBTTLinear(nn.Module):
    """`y = x · (L · diag(S) · R)^T + bias`, trained through the minimal fused Function.

    Build it from a trained layer with `FusedBTTLinear.from_linear(linear)`: at init
    `dense_weight()` equals `linear.weight` (to fp32 SVD rounding at full rank). It holds:

    - `l_core`: the L core (m, n*r, a) as a component, a `DenseCore` (parameter
      `l_core.btt_l`, frozen in the original linear's dtype or trained in
      `config.trainable_dtype`) or, for QFuRA, an `NF4Core`; `btt_l` reads the dense parameter
      (None for an NF4 core);
    - `btt_r` (n, b, m*r): the R core, trained in `config.trainable_dtype` (or frozen);
    - `btt_s` (m, n, r): the singular values when `s_merged_to` keeps them apart, else None;
    - `bias`: as on `nn.Linear`.

    All are registered tensors, so `.to()`, `state_dict()`, `to_empty()` and sharding see them.
    Compute runs in the input's dtype (or autocast's, inside an autocast region).
    """

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
        quant_type: str | None = None,
        double_quant: bool = True,
    ) -> None:
        """An uninitialised layer of the right shapes (fill it with `from_linear` or a state dict).

        `dtype` is the original linear's dtype: the storage of a frozen core. `quant_type="nf4"`
        stores the frozen L core in NF4 (`QFusedBTTLinear` sets it); `double_quant` applies then.
        """
        super().__init__()
        self.config = config if config is not None else FuRAConfig()
        if not isinstance(self.config, FuRAConfig):
            raise TypeError(f"FusedBTTLinear: config must be a FuRAConfig, got {type(self.config).__name__}")
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
        roles = self.roles
        self.l_core = self._make_l_core(quant_type, double_quant, device)

        def param(shape, trainable: bool, storage: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=device, dtype=storage), requires_grad=trainable)

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
        self._register_load_state_dict_pre_hook(_accept_merged_weights_only_if_equal, with_module=True)

    def _make_l_core(self, quant_type: str | None, double_quant: bool, device) -> nn.Module:
        shape, roles = self.block_shape, self.roles
        if quant_type is None:
            dtype = self.config.trainable_dtype if roles.train_l else self.base_dtype
            return DenseCore((shape.m, shape.n * shape.r, shape.a), dtype, device, trainable=roles.train_l)
        if quant_type not in QUANT_TYPES:
            raise ValueError(
                f"{self._where}: quant_type={quant_type!r} is not supported; expected one of {QUANT_TYPES}"
            )
        problem = qfura_layout_problem(shape, roles, self.config)
        if problem:
            raise ValueError(f"{self._where}: {problem}")
        return NF4Core(self.out_features, shape.n * shape.r, self.base_dtype, device, double_quant, label=self._where)

    @property
    def btt_l(self) -> nn.Parameter | None:
        """The dense L core (m, n*r, a), or None when the core is stored quantised."""
        return self.l_core.dense_parameter

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
            layer.l_core.btt_l.copy_(btt_l)
            layer.btt_r.copy_(btt_r)
            if layer.btt_s is not None:
                layer.btt_s.copy_(btt_s)
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.remember_initial_state()
        return layer

    def remember_initial_state(self) -> None:
        """Keep a CPU copy of the trainable tensors as decomposed (the size of an adapter), so that
        `base_linear()` can rebuild the base layer after training: an adapter swap puts the base
        back wherever the new adapter has no layer."""
        self.initial_trainables = {
            name: p.detach().to("cpu", copy=True) for name, p in self.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def base_linear(self) -> nn.Linear:
        """The base `nn.Linear` this layer was decomposed from (its merge at the decomposition's
        own values, to fp32 SVD rounding), whatever training has done since."""
        initial = getattr(self, "initial_trainables", None)
        if initial is None:
            raise ValueError(
                f"{self._where}: its values as decomposed are not known (it was built from a state dict or on "
                "the meta device, not by from_linear), so the base layer cannot be rebuilt"
            )
        state = {name: value for name, value in self.state_dict().items()}
        state.update({name: value.to(self.device) for name, value in initial.items()})
        return self.to_linear(state)

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

    def _refuse_input(self, x) -> None:
        """Raise the error that says what is wrong with an input the forward cannot take."""
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
        # Runs once per layer per step: parameters are read from `_parameters` (a dict lookup)
        # rather than through nn.Module.__getattr__ (a Python call each), and every check is a
        # C-level test, with the error message built only when one fails.
        params = self._parameters
        btt_r = params["btt_r"]
        if not (
            isinstance(x, torch.Tensor)
            and x.dtype.is_floating_point
            and x.dim() > 0
            and x.shape[-1] == self.in_features
            and x.device == btt_r.device
        ):
            self._refuse_input(x)
        if torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling():
            # Our autograd Functions use the classic ctx API, which torch.func cannot transform; it
            # would fail deep inside with "must override the setup_context staticmethod".
            raise NotImplementedError(
                f"{self._where}: torch.func transforms (vmap, grad, jacrev, per-sample gradients) are not supported "
                "by FuRA's fused autograd Functions. Use torch.autograd (loss.backward, torch.autograd.grad), or merge "
                "the layers first (fura_kernels.merge_fura) to transform plain nn.Linear layers"
            )
        if torch._C._is_any_autocast_enabled():
            on = DEVICE_TYPES.get(x.device) or device_type(x)
            # The meta device has no autocast state to ask about (nn.Linear runs there, so must we).
            if on != "meta" and torch.is_autocast_enabled(on):
                dtype = torch.get_autocast_dtype(on)
                if x.dtype != dtype:
                    x = x.to(dtype)
        # x goes as it is, (..., in): the Function views it as (T, in) where no autograd node records it.
        return self._modules["l_core"].linear(x, btt_r, params["btt_s"], params["bias"])

    def dense_weight(self, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The dense `out x in` weight, differentiable, in the cores' promoted dtype.

        With `state` (this layer's own state dict, e.g. a slice of a gathered full state dict),
        the weight is built from those tensors instead of the layer's."""
        tensors = dict(self.named_parameters()) if state is None else state
        btt_r, btt_s = tensors["btt_r"], tensors.get("btt_s")
        dtype = torch.promote_types(self.l_core.dtype, btt_r.dtype)
        if btt_s is not None:
            dtype = torch.promote_types(dtype, btt_s.dtype)
        core_state = None if state is None else _sub_state(state, "l_core.")
        s = btt_s.to(dtype) if btt_s is not None else None
        return reference.dense_weight(self.l_core.materialize(dtype, core_state), btt_r.to(dtype), s)

    def _storage_dtype(self) -> torch.dtype:
        """The dtype a merged layer is stored in: the frozen core's, or the original's."""
        if not self.roles.train_l:
            return self.l_core.dtype
        if not self.roles.train_r:
            return self.btt_r.dtype
        return self.base_dtype

    @torch.no_grad()
    def to_linear(self, state: Mapping[str, torch.Tensor] | None = None) -> nn.Linear:
        """A plain `nn.Linear` with the merged weight, in the layer's storage dtype, on the layer's
        device (or, with `state`, on the device of those tensors)."""
        device = self.device if state is None else state["btt_r"].device
        # A merge is computed at the cores' precision: under an enclosing autocast region the
        # einsum would run in bf16 and the weight be stored with bf16's error (FURA_SPEC.md §6).
        with (
            torch.autocast(device.type, enabled=False)
            if torch.amp.is_autocast_available(device.type)
            else (contextlib.nullcontext())
        ):
            weight = self.dense_weight(state)
        bias = self.bias if state is None else state.get("bias")
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=self._storage_dtype(),
        )
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        shape, roles = self.block_shape, self.roles
        trained = [name for name, on in (("L", roles.train_l), ("R", roles.train_r), ("S", roles.s_trainable)) if on]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocks=(m={shape.m}, n={shape.n}, a={shape.a}, b={shape.b}, r={shape.r}), "
            f"mode={self.config.decomp_mode_for(self.module_name)}, trains={'+'.join(trained) or 'nothing'}, "
            f"s_merged_to={self.config.s_merged_to}"
        )


def _accept_merged_weights_only_if_equal(layer: FusedBTTLinear, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint that holds this layer's merged `weight` (and `bias`)
    instead of its cores (what `save_pretrained` of a converted model writes) is accepted only if
    it equals this layer's own merge, that is, if the FuRA adapter saved beside it was loaded
    first; its merged keys are then consumed. Otherwise the load would keep stale cores behind a
    warning (HF Trainer resumes with `strict=False`), or copy a merged bias, rounded to the base's
    dtype, over the trained one, so it raises instead. The weight and the bias are checked each
    on its own: a sharded checkpoint can hold them in different files, loaded one at a time."""
    weight_key, bias_key = prefix + "weight", prefix + "bias"
    if prefix + "btt_r" in state_dict or (weight_key not in state_dict and bias_key not in state_dict):
        return
    where = layer._where if layer.module_name else f"FuRA layer {prefix[:-1]!r}"
    with torch.no_grad():
        ours = layer.to_linear()
    for key, own in ((weight_key, ours.weight), (bias_key, ours.bias)):
        if key not in state_dict:
            continue
        stored = state_dict[key]
        if own is None or stored.shape != own.shape or not _equal_to_rounding(stored, own):
            raise ValueError(
                f"{where}: the checkpoint holds a merged {key.rsplit('.', 1)[1]} for this layer ({key}) that differs "
                "from the layer's own. It was written by save_pretrained of a FuRA model: load the adapter saved "
                "beside it first, with fura_kernels.load_fura_adapter(model, '<checkpoint>/fura_adapter'), or load "
                "the checkpoint into the plain base architecture with from_pretrained"
            )
        state_dict.pop(key)


def _equal_to_rounding(stored: torch.Tensor, ours: torch.Tensor) -> bool:
    """Equal up to one rounding of the stored dtype, plus the merge's own arithmetic error at fp32
    (another device, or an fp64 merge rounded to fp32, differs by that much)."""
    if not stored.dtype.is_floating_point:
        return False
    stored_eps, merge_eps = torch.finfo(stored.dtype).eps, torch.finfo(torch.float32).eps
    a, b = stored.detach().double().cpu(), ours.detach().double().cpu()
    scale = b.abs().max().item() if b.numel() else 0.0
    return bool(((a - b).abs() <= stored_eps * b.abs() + 16 * merge_eps * scale).all())


def _sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
