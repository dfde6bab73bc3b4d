"""The FuRA tuner layer in the transform form: a wrapper that never changes its base layer.

For the default layout (FURA_SPEC.md §11), each input block `j` of the base weight `W`
(out x in, cut into `n` blocks of `b` columns) has the thin SVD `W[:, j] = U_j · diag(S0_j) · V0_j`.
The trained FuRA weight `U_j · diag(S_j) · R_j` is then `W[:, j] · T_j` with
`T_j = V0_j^T · diag(S_j / S0_j) · R_j`, so

    y = base(x'),      x'_j = x_j · M_j,      M_j = T_j^T = R_j^T · diag(S_j / S0_j) · V0_j

(`R` is stored as FusedBTTLinear's `btt_r`, (n, b, r), i.e. `R_j^T`). The base layer runs its own
forward and backward on `x'` whatever it is: `nn.Linear`, bitsandbytes 4-bit or 8-bit, or
transformers' `Conv1D`. Per adapter the layer holds:

- `fura_R[name]` (n, b, r) and `fura_S[name]` (n, r): trained, fp32;
- `fura_bias[name]` (out,): a trained bias update, fp32, when the base has a bias and
  `train_bias` is on (the base bias stays as it is);
- `fura_V0[name]` (n, r, b), `fura_S0[name]` (n, r): the frozen SVD of the base's blocks, fp32;
- `fura_fingerprint[name]`: the sha256 of the base weight's values, so that an adapter is
  never loaded onto another base.

Nothing weight-sized is added: `R`, `S`, `V0` and `S0` together hold about `2 * in * b` values.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from .. import reference
from ..autograd import apply_block_transform
from ..autograd.common import DEVICE_TYPES, device_type
from ..factorization import (
    DEGENERATE_GAP,
    BlockShape,
    block_svd,
    resolve_block_shape,
    resolve_roles,
    weight_fingerprint,
)
from ..triton import segmented_block_transform
from .config import FuRAPeftConfig
from .mixed import BASE_ADAPTER, MapFamily, MixedBatch, ServingMaps, source_key


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def supports_base_layer(module: nn.Module) -> bool:
    """Whether FuRA's transform form can wrap this layer: `nn.Linear` and its bitsandbytes
    subclasses (`Linear4bit`, `Linear8bitLt`), and transformers' `Conv1D`."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _standard_bnb_layout(base: nn.Module) -> None:
    """bitsandbytes' CPU inference repacks a 4-bit weight for its own kernel the first time it runs
    (`quant_state.packing_format_for_cpu`); read or re-quantised as the standard layout, that
    weight comes out wrong (a merge was off by 24% here). Put it back first, as bitsandbytes does
    itself before it saves a state dict or moves the weight to a GPU."""
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def _fingerprint_bytes(hexdigest: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(hexdigest)), dtype=torch.uint8)


def fingerprint_hex(digest: torch.Tensor) -> str | None:
    """The hex sha256 a `fura_fingerprint` buffer holds, or None for an unset (all-zero) one."""
    if digest.device.type == "meta" or not bool(digest.any()):
        return None
    return bytes(digest.cpu().tolist()).hex()


class FuRALinear(nn.Module, BaseTunerLayer):
    """A base layer with FuRA adapters in the transform form (see the module docstring).

    Named `...Linear` after PEFT's convention (`lora.Linear` wraps Conv1D too): PEFT recognises an
    adapted linear layer by that name, so that `"all-linear"` finds it again for a second adapter."""

    adapter_layer_names = ("fura_R", "fura_S", "fura_bias")
    other_param_names = ("fura_V0", "fura_S0", "fura_fingerprint")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: FuRAPeftConfig,
        *,
        module_name: str | None = None,
        model_config: Any = None,
    ) -> None:
        super().__init__()
        if not supports_base_layer(base_layer):
            raise TypeError(
                f"FuRA layer {module_name!r}: {type(base_layer).__name__} is not supported; the transform form wraps "
                "nn.Linear, bitsandbytes Linear4bit/Linear8bitLt and transformers' Conv1D"
            )
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(base_layer)
        self.fan_in_fan_out = _is_conv1d(base_layer)
        in_features, out_features = _get_in_out_features(base_layer)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.module_name = module_name
        self.model_config = model_config
        self.fura_R = nn.ParameterDict({})
        self.fura_S = nn.ParameterDict({})
        self.fura_bias = nn.ParameterDict({})
        self.fura_V0 = BufferDict({}, persistent=True)
        self.fura_S0 = BufferDict({}, persistent=True)
        self.fura_fingerprint = BufferDict({}, persistent=True)
        self.block_shapes: dict[str, BlockShape] = {}
        # Adapters built from a saved config, whose tensors a state dict has not filled yet.
        self.awaiting_saved_tensors: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.serving_maps: ServingMaps | None = None  # mixed-batch maps, built on first use
        self._register_load_state_dict_pre_hook(_note_loaded_adapters, with_module=True)
        self.update_layer(adapter_name, config)

    @property
    def _where(self) -> str:
        return f"FuRA layer {self.module_name!r}" if self.module_name else "FuRA layer"

    # ----------------------------------------------------------------------------------------
    # the base weight, whatever stores it

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in) values (dequantised for bitsandbytes layers), no copy for
        a plain layer."""
        _standard_bnb_layout(self.get_base_layer())
        weight = self.get_base_weight()
        return weight.t() if self.fan_in_fan_out else weight

    def _set_base_weight_out_in(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        if self.fan_in_fan_out:
            weight = weight.t()
        if self.quantization_backend is not None:
            _standard_bnb_layout(base)
            self.quantization_backend.set_base_weight(self, weight.to(self.get_base_weight().dtype).contiguous())
        else:
            base.weight.data = weight.to(base.weight.dtype).contiguous()

    def base_fingerprint(self) -> str:
        """sha256 of the base weight's values (bf16-rounded sample; see `weight_fingerprint`)."""
        return weight_fingerprint(self.base_weight_out_in())

    def _device(self) -> torch.device:
        """The base weight's device. (Read from the base layer's own table when it is not itself a
        tuner layer: this runs in every forward.)"""
        weight = self._modules["base_layer"]._parameters.get("weight")
        if weight is None:
            weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if weight is not None else torch.device("cpu")

    # ----------------------------------------------------------------------------------------
    # adapters

    def update_layer(self, adapter_name: str, config: FuRAPeftConfig, **_: Any) -> None:
        """Add adapter `adapter_name`: the per-block SVD of the base weight (on its device, in
        `config.svd_dtype`), or empty tensors waiting for a saved adapter's state dict."""
        fura_config = config.fura_config()
        shape = resolve_block_shape(
            self.in_features, self.out_features, fura_config, self.module_name, self.model_config
        )
        roles = resolve_roles(shape, fura_config)
        if roles.train_l:
            raise ValueError(
                f"{self._where}: train_position={config.train_position!r} trains the L core here (out_features="
                f"{self.out_features} <= b={shape.b}, so L is not the larger core), and the transform form never "
                "stores L; exclude this layer (exclude_modules) or give it more input blocks with input_factorization"
            )
        n, b, r = shape.n, shape.b, shape.r
        device = self._device()
        awaiting = getattr(config, "_awaiting_saved_tensors", False) or device.type == "meta"
        if awaiting:
            r_core = torch.zeros(n, b, r, device=device)
            s0 = torch.ones(n, r, device=device)
            v0 = torch.zeros(n, r, b, device=device)
            fingerprint = torch.zeros(32, dtype=torch.uint8, device=device)
        else:
            v0, s0 = self._decompose(shape, fura_config.svd_dtype)
            r_core = v0.transpose(1, 2).contiguous()
            fingerprint = _fingerprint_bytes(self.base_fingerprint()).to(device)
        self.block_shapes[adapter_name] = shape
        self.fura_R[adapter_name] = nn.Parameter(r_core.float())
        self.fura_S[adapter_name] = nn.Parameter(s0.float().clone())
        self.fura_V0[adapter_name] = v0.float()
        self.fura_S0[adapter_name] = s0.float()
        self.fura_fingerprint[adapter_name] = fingerprint
        if self.get_base_layer().bias is not None and config.train_bias:
            self.fura_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features, device=device))
        if awaiting and device.type != "meta":
            self.awaiting_saved_tensors.add(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def _decompose(self, shape: BlockShape, svd_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(V0, S0)` of every input block of the base weight, sign-canonical; refuses a block
        with a (numerically) zero singular value, which the transform form would divide by."""
        weight = self.base_weight_out_in()
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{self._where}: base weight dtype {weight.dtype} is not floating point")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{self._where}: the base weight holds NaN or inf values; cannot decompose it")
        _, s, vh = block_svd(weight, shape, svd_dtype)
        s0, v0 = s[0], vh[0]  # (n, r), (n, r, b): one block row in this layout
        ratio = s0[:, -1] / s0[:, 0].clamp(min=torch.finfo(s0.dtype).tiny)
        worst = int(ratio.argmin())
        if float(ratio[worst]) < DEGENERATE_GAP:
            raise ValueError(
                f"{self._where}: input block {worst} has a (numerically) zero singular value "
                f"(smallest/largest = {float(ratio[worst]):.3e} < {DEGENERATE_GAP:g}); the transform form divides by "
                "it (T = V0^T diag(S/S0) R), so its directions cannot be trained here. Exclude this layer "
                "(exclude_modules), lower the rank, or use fura_kernels.convert_to_fura"
            )
        return v0, s0

    def _active_adapter_here(self) -> str | None:
        """The one active adapter this layer holds, or None. Two FuRA adapters active at once
        are refused: each replaces the layer's function, so there is no sum to take."""
        active = [name for name in self.active_adapters if name in self.fura_R]
        if len(active) > 1:
            raise ValueError(
                f"{self._where}: adapters {active} are active together; a FuRA adapter transforms the layer's input, "
                "so only one can be active at a time (set_adapter(name))"
            )
        return active[0] if active else None

    def _check_loaded(self, adapter_name: str) -> None:
        if adapter_name in self.awaiting_saved_tensors:
            raise RuntimeError(
                f"{self._where}: adapter {adapter_name!r} was built from a saved adapter config, but no saved tensors "
                "were loaded into it; load it with PeftModel.from_pretrained / load_adapter, or create a new "
                "adapter with get_peft_model(model, FuRAPeftConfig(...))"
            )

    def transform_maps(self, adapter_name: str) -> torch.Tensor:
        """`M_j = R_j^T · diag(S_j / S0_j) · V0_j` (n, b, b) in fp32, differentiable in R and S."""
        return reference.transform_blocks(
            self.fura_R[adapter_name], self.fura_S[adapter_name], self.fura_V0[adapter_name], self.fura_S0[adapter_name]
        )

    def _forward_maps(self, adapter: str) -> torch.Tensor:
        """The maps a forward applies: built from `R` and `S` (differentiable), or, for an adapter
        served from its cached map (`serve_from_map`: its tensors live on another device), that map."""
        r_core = self.fura_R[adapter]
        if r_core.device == self._device():
            return self.transform_maps(adapter)
        if self.training:
            raise ValueError(
                f"{self._where}: adapter {adapter!r} is served from its cached map (its R and S are on "
                f"{r_core.device}), so it cannot train; move them back first (model.to({str(self._device())!r}))"
            )
        return self.refresh_serving_maps().map_of(adapter)

    def forward(
        self, x: torch.Tensor, *args: Any, fura_mixed_batch: MixedBatch | None = None, **kwargs: Any
    ) -> torch.Tensor:
        # Runs once per layer per step: PEFT's state is read from its attributes and the adapter
        # tensors from the containers' own tables (each `self.fura_R[name]` would be three Python
        # calls through nn.Module and ParameterDict); the checks are C-level tests, with the
        # messages built only when one fails.
        if fura_mixed_batch is not None:
            return self._mixed_batch_forward(x, fura_mixed_batch, *args, **kwargs)
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        adapter = self._active_adapter  # PEFT keeps a name, or a list of names
        if type(adapter) is list and len(adapter) == 1:
            adapter = adapter[0]
        r_cores = self._modules["fura_R"]._parameters
        if type(adapter) is not str or adapter not in r_cores:  # several names, or one this layer lacks
            adapter = self._active_adapter_here()
            if adapter is None:
                return self.base_layer(x, *args, **kwargs)
        if adapter in self.awaiting_saved_tensors:
            self._check_loaded(adapter)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._where}: input of shape {tuple(x.shape)}; expected last dimension {self.in_features}"
            )
        # The transform computes in the dtype the base layer's GEMM will see: autocast's inside a
        # region, else the input's. The fp32 maps are read as they are (no cast of their own).
        if torch._C._is_any_autocast_enabled():
            on = DEVICE_TYPES.get(x.device) or device_type(x)
            if on != "meta" and torch.is_autocast_enabled(on):
                dtype = torch.get_autocast_dtype(on)
                if x.dtype != dtype:
                    x = x.to(dtype)
        r_core = r_cores[adapter]
        if r_core.device == self._device():
            buffers = self._modules["fura_V0"]._buffers, self._modules["fura_S0"]._buffers
            maps = reference.transform_blocks(
                r_core, self._modules["fura_S"]._parameters[adapter], buffers[0][adapter], buffers[1][adapter]
            )
        else:
            maps = self._forward_maps(adapter)
        out = self._modules["base_layer"](apply_block_transform(x, maps), *args, **kwargs)
        bias = self._modules["fura_bias"]._parameters.get(adapter)
        if bias is not None:
            out = out + (bias if bias.dtype == out.dtype and bias.device == out.device else bias.to(out))
        return out

    # ----------------------------------------------------------------------------------------
    # mixed-adapter batches (serving)

    def _adapter_sources(self, name: str) -> list[torch.Tensor | None]:
        return [self.fura_R[name], self.fura_S[name], self.fura_V0[name], self.fura_S0[name], self.fura_bias.get(name)]

    def serving_dtype(self) -> torch.dtype:
        """The dtype of the cached maps: a half-precision base weight's (its layer takes only
        activations of that dtype, and the kernels cast an fp32 map to the activation dtype at the
        dot anyway, so the copy gives the same products at half the bytes), else fp32 (fp32 and
        quantised bases, whose activations may be fp32)."""
        dtype = getattr(getattr(self.get_base_layer(), "weight", None), "dtype", None)
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32

    def _serving_map(self, name: str) -> torch.Tensor:
        return self.transform_maps(name).to(device=self._device(), dtype=self.serving_dtype())

    @torch.no_grad()
    def serve_from_map(self, name: str, device: str | torch.device = "cpu") -> int:
        """Keep only adapter `name`'s cached map (`in * b` values) on the base's device and move its
        `R`, `S`, `V0`, `S0` and bias update to `device`, frozen. Mixed batches and the adapter's
        own forward then read the map; saving, merging and `get_delta_weight` read the moved
        tensors. `model.to(...)` brings them back (and the map is built again from them).
        Returns the bytes moved off the base's device."""
        if name not in self.fura_R:
            return 0
        self._check_loaded(name)
        self.refresh_serving_maps()
        target, moved = torch.device(device), 0
        for attr in self.adapter_layer_names + ("fura_V0", "fura_S0"):
            container = getattr(self, attr)
            if name not in container or container[name].device == target:
                continue
            tensor = container[name]
            moved += tensor.numel() * tensor.element_size()
            if isinstance(tensor, nn.Parameter):
                container[name] = nn.Parameter(tensor.detach().to(target), requires_grad=False)
            else:
                container[name] = tensor.to(target)
        self.serving_maps.sources[name] = source_key(self._adapter_sources(name))  # the same values: keep the map
        return moved

    @torch.no_grad()
    def refresh_serving_maps(self) -> ServingMaps:
        """The maps `M_k` of every loaded adapter, stacked per block shape, and their bias updates.

        An adapter's map is computed once and kept until its tensors change (an optimizer step,
        a load, a move to another device); then only that adapter's map is computed again. The
        stack holds `in * b` values per adapter, in the dtype the maps meet the activations in
        (`serving_dtype`), so a mixed batch computes what each adapter alone computes."""
        names = sorted(name for name in self.fura_R if name not in self.awaiting_saved_tensors)
        sources = {name: source_key(self._adapter_sources(name)) for name in names}
        old = self.serving_maps
        if old is not None and old.sources == sources:
            return old
        kept = {}
        if old is not None:
            for family in old.families:
                for slot, name in enumerate(family.names):
                    if old.sources.get(name) == sources.get(name):
                        kept[name] = family.maps[slot].to(device=self._device(), dtype=self.serving_dtype())
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name in names:
            shape = self.block_shapes[name]
            by_shape.setdefault((shape.n, shape.b), []).append(name)
        families = [
            MapFamily(
                tuple(group), torch.stack([kept[name] if name in kept else self._serving_map(name) for name in group])
            )
            for group in by_shape.values()
        ]
        bias_names = tuple(name for name in names if name in self.fura_bias)
        bias = None
        if bias_names:
            rows = [self.fura_bias[name].float().to(self._device()) for name in bias_names]
            bias = torch.stack([*rows, torch.zeros_like(rows[0])])
        self.serving_maps = ServingMaps(families, sources, bias, bias_names=bias_names)
        return self.serving_maps

    def _mixed_batch_forward(self, x: torch.Tensor, mixed: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`base(x')` with each sequence `i` of the batch transformed by its own adapter's map
        (`mixed.sequence_adapters[i]`; the base model's sequences and adapters this layer does
        not hold pass unchanged), in one segmented launch, then the bias updates by sequence."""
        if self.merged:
            raise ValueError(
                f"{self._where}: adapter(s) {self.merged_adapters} are merged into the base weight, so a mixed-adapter "
                "batch would run them under every other adapter; unmerge first (model.unmerge_adapter())"
            )
        if self.disable_adapters:
            raise ValueError(
                f"{self._where}: adapters are disabled (disable_adapter()), but adapter_names asks for "
                f"{sorted(mixed.used)}; pass adapter_names=['{BASE_ADAPTER}', ...] for the base model instead"
            )
        for name in mixed.used:
            if name in self.fura_R:
                self._check_loaded(name)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._where}: input of shape {tuple(x.shape)}; expected last dimension {self.in_features}"
            )
        batch = mixed.batch_size
        if x.dim() < 2 or x.shape[0] != batch:
            raise ValueError(
                f"{self._where}: input of shape {tuple(x.shape)} in a mixed-adapter batch of {batch} sequences "
                f"(len(adapter_names) = {batch}); the first dimension must be the batch, one adapter name per sequence"
            )
        serving = self.serving_maps if self.serving_maps is not None else self.refresh_serving_maps()
        if not any(name in mixed.used for family in serving.families for name in family.names):
            return self.base_layer(x, *args, **kwargs)  # no sequence runs an adapter of this layer
        device_type = x.device.type
        if device_type != "meta" and torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        routing = mixed.routing(x[0].numel() // self.in_features, x.device)
        tokens = x.reshape(-1, self.in_features)
        for family in serving.families:
            _, n, b, _ = family.maps.shape
            slots = family.slots_for(mixed.adapters)
            transformed = segmented_block_transform(
                tokens.reshape(-1, n, b), family.maps, routing.rows, routing.group_offsets, slots, routing.largest_group
            )
            tokens = transformed.reshape(-1, self.in_features)
        out = self.base_layer(tokens.reshape(x.shape), *args, **kwargs)
        if serving.bias is not None:
            rows = serving.bias_rows_for(mixed.adapters)[routing.sequence_group]
            out = out + serving.bias[rows].to(out.dtype).reshape(batch, *([1] * (out.dim() - 2)), -1)
        return out

    # ----------------------------------------------------------------------------------------
    # merge / unmerge

    @torch.no_grad()
    def _transformed_weight(self, weight: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """`W[:, j] · M_j^T` for every block: (out, in) -> (out, in), in at least fp32."""
        n, b, _ = maps.shape
        dtype = torch.promote_types(torch.promote_types(weight.dtype, maps.dtype), torch.float32)
        w3 = weight.to(dtype).reshape(self.out_features, n, b)
        return torch.einsum("ojd,jkd->ojk", w3, maps.to(device=w3.device, dtype=dtype)).reshape(
            self.out_features, n * b
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """`W <- W · blockdiag(T)` (and the bias update into the bias), at fp32; a quantised base is
        dequantised, merged and quantised again."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.fura_R]
        if not adapter_names:
            return
        if len(adapter_names) + len(self.merged_adapters) > 1:
            raise ValueError(
                f"{self._where}: merging {adapter_names} (merged already: {self.merged_adapters}); a FuRA adapter "
                "transforms the layer's input, so only one can be merged at a time"
            )
        name = adapter_names[0]
        self._check_loaded(name)
        if self.quantization_backend is not None:
            warnings.warn(
                f"{self._where}: merging into a {self.quantization_backend.backend_name} base quantises the merged "
                "weight again; the merged model differs from the adapter's by that rounding",
                stacklevel=2,
            )
        with torch.no_grad():
            merged = self._transformed_weight(self.base_weight_out_in(), self.transform_maps(name))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"{self._where}: NaNs or infs in the merged weight of adapter {name!r}; not merged")
            self._set_base_weight_out_in(merged)
            if name in self.fura_bias:
                bias = self.get_base_layer().bias
                bias.data = (bias.float() + self.fura_bias[name].float().to(bias.device)).to(bias.dtype)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo `merge`: `W <- W' · blockdiag(T)^+` (exact to rounding when every block keeps its full
        rank; a truncated rank dropped part of W at merge, so it cannot be unmerged)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        name = self.merged_adapters[-1]
        shape = self.block_shapes[name]
        if shape.r < min(self.out_features, shape.b):
            raise ValueError(
                f"{self._where}: adapter {name!r} has rank {shape.r} < min(out_features, b) = "
                f"{min(self.out_features, shape.b)}: "
                "merging it dropped the rest of each block, so it cannot be unmerged"
            )
        with torch.no_grad():
            maps = self.transform_maps(name).double()
            merged = self.base_weight_out_in()
            restored = self._transformed_weight(merged.double(), torch.linalg.pinv(maps))
            self._set_base_weight_out_in(restored)
            if name in self.fura_bias:
                bias = self.get_base_layer().bias
                bias.data = (bias.float() - self.fura_bias[name].float().to(bias.device)).to(bias.dtype)
        self.merged_adapters.pop()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`W · blockdiag(T) - W` in the base layer's weight orientation, fp32 (what merging adds)."""
        with torch.no_grad():
            weight = self.base_weight_out_in().float()
            delta = self._transformed_weight(weight, self.transform_maps(adapter_name)) - weight
        return delta.t() if self.fan_in_fan_out else delta

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move (never cast) an adapter to the base layer's device: R and S train in fp32 whatever
        the base's dtype."""
        target = device if device is not None else self._device()
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name not in container or container[adapter_name].device.type == "meta":
                continue
            tensor = container[adapter_name]
            if isinstance(tensor, nn.Parameter):
                container[adapter_name] = nn.Parameter(tensor.detach().to(target), requires_grad=tensor.requires_grad)
            else:
                container[adapter_name] = tensor.to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.serving_maps = None  # drop its cached map now, not at the next mixed batch
        self.block_shapes.pop(adapter_name, None)
        self.awaiting_saved_tensors.discard(adapter_name)

    def __repr__(self) -> str:
        return "fura." + super().__repr__()


def _note_loaded_adapters(layer: FuRALinear, state_dict, prefix: str, *args: Any) -> None:
    """A load of this layer's state marks the adapters whose tensors it carries as filled."""
    for name in list(layer.awaiting_saved_tensors):
        if all(f"{prefix}{attr}.{name}" in state_dict for attr in ("fura_R", "fura_S", "fura_V0", "fura_S0")):
            layer.awaiting_saved_tensors.discard(name)
