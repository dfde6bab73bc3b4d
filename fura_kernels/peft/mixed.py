"""Mixed-adapter batches: each sequence of a batch runs its own FuRA adapter, on one shared base.

In the transform form (FURA_SPEC.md §11) adapter `k` is the block-diagonal input map `M_k` in
front of the untouched base layer, so a batch that mixes adapters needs one segmented
block-diagonal product (`x'_t = x_t · M_{k(t)}`, one launch whatever the number of adapters) and
then the base layer once for every token. This module holds the two pieces of state that make
that cheap on the host:

- `MixedBatch`: which adapter runs each sequence, for one `model(...)` or `generate(...)` call.
  It turns the sequences' adapter names into device routing tensors (tokens grouped by adapter)
  once per sequence length, shared by every layer: a decode step copies nothing to the device.
- `ServingMaps`: one layer's maps `M_k`, stacked, built once per adapter and kept until that
  adapter's tensors change (in place or replaced), so serving computes no map per step.

`"__base__"` names the base model (no adapter), as in PEFT's API for LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class Routing:
    """A batch's tokens grouped by adapter: group `g` (model-wide adapter `g`, the last one the
    base) owns rows `rows[group_offsets[g]:group_offsets[g + 1]]` of the (tokens, features) view."""

    rows: torch.Tensor  # (B * S,) int32
    group_offsets: torch.Tensor  # (G + 1,) int32
    sequence_group: torch.Tensor  # (B,) int64: the group of each sequence
    largest_group: int  # tokens in the largest group (sizes the kernel's grid)


class MixedBatch:
    """The adapters of one mixed batch: `sequence_adapters[i]` runs sequence `i`.

    `adapters` lists every FuRA adapter of the model (its order numbers the groups; the base is
    group `len(adapters)`), so a layer's slot table depends on the model, not on the request."""

    def __init__(self, sequence_adapters: list[str], adapters: tuple[str, ...]) -> None:
        self.sequence_adapters = list(sequence_adapters)
        self.adapters = adapters
        index = {name: g for g, name in enumerate(adapters)}
        self.sequence_groups = [index.get(name, len(adapters)) for name in self.sequence_adapters]
        self.used = {name for name in self.sequence_adapters if name != BASE_ADAPTER}
        self._routing: dict[tuple[int, torch.device], Routing] = {}

    @property
    def batch_size(self) -> int:
        return len(self.sequence_adapters)

    def routing(self, tokens_per_sequence: int, device: torch.device) -> Routing:
        """The routing of a (batch, tokens_per_sequence, ...) input on `device`, built on the host
        and copied once (one int32 transfer) per sequence length."""
        key = (tokens_per_sequence, device)
        routing = self._routing.get(key)
        if routing is None:
            routing = self._routing[key] = self._build(tokens_per_sequence, device)
        return routing

    def _build(self, tokens_per_sequence: int, device: torch.device) -> Routing:
        groups = torch.tensor(self.sequence_groups, dtype=torch.int64)
        order = torch.argsort(groups, stable=True)  # sequences grouped by adapter
        rows = (order[:, None] * tokens_per_sequence + torch.arange(tokens_per_sequence)).reshape(-1)
        counts = torch.bincount(groups, minlength=len(self.adapters) + 1) * tokens_per_sequence
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        packed = torch.cat([rows, offsets, groups]).to(torch.int32).to(device)
        n_rows, n_offsets = rows.numel(), offsets.numel()
        return Routing(
            rows=packed[:n_rows],
            group_offsets=packed[n_rows : n_rows + n_offsets],
            sequence_group=packed[n_rows + n_offsets :].long(),
            largest_group=int(counts.max()) if counts.numel() else 0,
        )


def source_key(tensors: list[torch.Tensor | None]) -> tuple:
    """What identifies an adapter's tensors as they are now: the objects, their storage and their
    version counters (bumped by every in-place write: an optimizer step, `load_state_dict`)."""
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version, t.device) for t in tensors)


@dataclass
class MapFamily:
    """The maps of one layer's adapters that share a block shape, stacked: `maps[slot]` (n, b, b)."""

    names: tuple[str, ...]
    maps: torch.Tensor
    group_slots: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)

    def slots_for(self, adapters: tuple[str, ...]) -> torch.Tensor:
        """(G + 1,) int32 on the maps' device: the slot of each model-wide adapter here, -1 for
        the base and for adapters this family does not hold. Built once per adapter list."""
        table = self.group_slots.get(adapters)
        if table is None:
            slot = {name: s for s, name in enumerate(self.names)}
            values = [slot.get(name, -1) for name in adapters] + [-1]
            table = self.group_slots[adapters] = torch.tensor(values, dtype=torch.int32).to(self.maps.device)
        return table


@dataclass
class ServingMaps:
    """One layer's cached maps (and bias updates) for mixed batches."""

    families: list[MapFamily]
    sources: dict[str, tuple]
    bias: torch.Tensor | None = None  # (A + 1, out) fp32, row A zero: the base / no bias update
    bias_rows: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)
    bias_names: tuple[str, ...] = ()

    def map_of(self, name: str) -> torch.Tensor:
        """Adapter `name`'s cached map (n, b, b)."""
        for family in self.families:
            if name in family.names:
                return family.maps[family.names.index(name)]
        raise KeyError(name)

    def bias_rows_for(self, adapters: tuple[str, ...]) -> torch.Tensor:
        """(G + 1,) int64: the row of `bias` each model-wide adapter adds (the zero row for none)."""
        table = self.bias_rows.get(adapters)
        if table is None:
            row = {name: r for r, name in enumerate(self.bias_names)}
            zero = len(self.bias_names)
            values = [row.get(name, zero) for name in adapters] + [zero]
            table = self.bias_rows[adapters] = torch.tensor(values, dtype=torch.int64).to(self.bias.device)
        return table
