"""Two-process DDP and FSDP2 training on the CPU (gloo), against single-process training."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from fura_kernels import convert_to_fura, load_fura_adapter

from . import distributed_workers as workers
from .helpers import max_rel_err, tiny_llama

WORLD = 2
TIMEOUT_S = 240


def _spawn(fn, tmp):
    """Start WORLD processes and wait for them, within TIMEOUT_S; none is left running."""
    context = mp.start_processes(fn, args=(WORLD, str(tmp)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
    assert all(not p.is_alive() for p in context.processes)


@pytest.fixture(scope="module")
def single_process():
    model = tiny_llama(seed=0, attention_bias=False)
    convert_to_fura(model, "all-linear", progress=False)
    model.train()
    losses = workers.train_single_process(model)
    return losses, {n: p.detach() for n, p in workers.trainables(model).items()}


@pytest.mark.slow
def test_ddp_equals_single_process(tmp_path, single_process):
    _spawn(workers.ddp_worker, tmp_path)
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert report["missing_grads"] == []  # every trainable tensor got a gradient every step
    losses, final = single_process
    for a, b in zip(report["losses"], losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    trained = load_file(str(tmp_path / "ddp.safetensors"))
    assert trained.keys() == final.keys()
    for name, value in final.items():
        assert max_rel_err(trained[name], value) < 1e-4, name  # fp32 summation order, through AdamW


@pytest.mark.slow
def test_fsdp2_from_meta_equals_single_process(tmp_path, single_process):
    init = tiny_llama(seed=0, attention_bias=False)
    convert_to_fura(init, "all-linear", progress=False)
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(tmp_path / "init.safetensors"))
    _spawn(workers.fsdp_worker, tmp_path)
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert report["is_fura"] and report["sharded"] == [True]  # parameters are sharded DTensors...
    assert report["forward_saw_dtensor"] and not any(report["forward_saw_dtensor"])  # ...but whole in forward
    assert report["missing_grads"] == []
    losses, final = single_process
    for a, b in zip(report["losses"], losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    trained = load_file(str(tmp_path / "fsdp.safetensors"))
    for name, value in final.items():
        assert max_rel_err(trained[name], value) < 1e-4, name  # fp32 summation order, through AdamW
    # The adapter saved from the shards holds full tensors and loads onto a fresh base.
    fresh = tiny_llama(seed=0, attention_bias=False)
    load_fura_adapter(fresh, tmp_path / "fsdp_adapter", progress=False)
    for name, value in trained.items():
        assert torch.equal(fresh.get_parameter(name).detach(), value), name
