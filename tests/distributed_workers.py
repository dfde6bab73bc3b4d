"""Worker processes for tests/test_distributed.py (importable by spawned children)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from fura_kernels import FusedBTTLinear, convert_to_fura, save_fura_adapter
from fura_kernels.distributed import materialize_from_meta, shard_fura_model

from .helpers import tiny_llama

# No attention biases: the key bias has an exactly-zero gradient (softmax ignores a constant
# shift), so AdamW would turn its rounding noise into lr-sized, run-dependent steps.
STEPS = 3
GLOBAL_BATCH = 4
LR = 1e-2


def global_batches(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, 16), generator=generator) for _ in range(STEPS)]


def trainables(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_single_process(model) -> list[float]:
    """The reference: one process, the whole global batch each step."""
    opt = torch.optim.AdamW(list(trainables(model).values()), lr=LR)
    losses = []
    for ids in global_batches(model.config.vocab_size):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _init(rank: int, world: int, tmp: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)


def _train_local(model, wrapped, rank: int, world: int, report: dict) -> None:
    params = trainables(model)
    opt = torch.optim.AdamW(list(params.values()), lr=LR)
    report["missing_grads"] = []
    report["losses"] = []
    for ids in global_batches(model.config.vocab_size):
        local = ids.chunk(world)[rank]
        loss = wrapped(input_ids=local, labels=local).loss
        loss.backward()
        report["missing_grads"] += [n for n, p in params.items() if p.grad is None]
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        report["losses"].append(total.item() / world)


def ddp_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    try:
        model = tiny_llama(seed=0, attention_bias=False)
        convert_to_fura(model, "all-linear", progress=False)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters stays False
        report: dict = {}
        _train_local(model, ddp, rank, world, report)
        if rank == 0:
            save_file({n: p.detach().contiguous() for n, p in trainables(model).items()}, f"{tmp}/ddp.safetensors")
            Path(f"{tmp}/ddp.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def fsdp_worker(rank: int, world: int, tmp: str) -> None:
    """Meta-device build, FuRA conversion (shapes only), FSDP2 sharding per decoder layer,
    weights broadcast from rank 0, training, then an adapter saved from the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    _init(rank, world, tmp)
    try:
        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            model = tiny_llama(seed=0, attention_bias=False)
        convert_to_fura(model, "all-linear", progress=False)
        shard_fura_model(model, mesh=mesh)
        full = load_file(f"{tmp}/init.safetensors") if rank == 0 else None
        materialize_from_meta(model, "cpu", full)
        model.train()
        report: dict = {"sharded": [], "forward_saw_dtensor": []}
        layer = model.model.layers[0].self_attn.q_proj
        report["sharded"].append(isinstance(layer.btt_r, DTensor))

        def check(module, args):
            report["forward_saw_dtensor"].append(
                any(isinstance(p, DTensor) for p in (module.btt_l, module.btt_r, module.btt_s))
            )

        handle = layer.register_forward_pre_hook(check)
        _train_local(model, model, rank, world, report)
        handle.remove()
        save_fura_adapter(model, f"{tmp}/fsdp_adapter")  # a collective: every rank gathers, rank 0 writes
        final = {n: p.full_tensor().contiguous() for n, p in trainables(model).items()}
        report["is_fura"] = isinstance(layer, FusedBTTLinear)
        if rank == 0:
            save_file(final, f"{tmp}/fsdp.safetensors")
            Path(f"{tmp}/fsdp.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()
