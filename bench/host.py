"""The host side of a training step: `python -m bench host`.

What a GPU waits on when a step is host-bound is the Python and C work of issuing it. This suite
measures that work on any machine, in launch-only mode (`FURA_LAUNCH_ONLY=1`, see
`fura_kernels.triton.launch_only`): fura-kernels' Triton kernels compile for an H100 and every
launch runs Triton's whole launch path up to the driver's launch call, which does nothing; every
other operation (PyTorch's own, bitsandbytes', PEFT's) runs for real on CPU tensors, at widths
so small that its arithmetic costs about what a GPU launch costs the host. For each method it
records, per layer forward + backward (the primary figure: a model runs one optimizer step for
all its tensors) and per layer step with `AdamW(fused=True)` beside it, and per whole-model SFT
step (a Llama with Llama-3-8B's 32 decoder layers and all seven projections, at tiny widths,
with and without the optimizer step):

- host time: the median of each round's per-call times, the fastest round of several (the
  machine is shared: the least disturbed round is the best estimate of the work), with the
  round's 20th and 80th percentiles, and the spread of the round medians;
- Python-level and C-level calls (`sys.setprofile` events) of one call.

Methods: the frozen dense layer (the floor: forward + dx), FuRA, QFuRA, FuRA's PEFT form on a
plain and on an NF4 base, PEFT LoRA r=32 and QLoRA r=32, all built as `bench.methods` builds
them, and timed interleaved (method after method, round after round), so a drift of the machine
touches them alike. Configurations:

- `fair`: what HF Trainer does with `bf16=True` (bf16 base, fp32 trainables, bf16 autocast,
  fused AdamW);
- `fp32`: everything fp32, no autocast. A CPU's bf16 matmul costs 20 µs or more whatever its
  size (oneDNN's set-up), ten times a GPU launch's host cost, so under `fair` the CPU charges a
  method for how many matmuls it runs; in fp32 an op of these sizes costs 1-3 µs, like a GPU
  launch. The targets are read in both.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .methods import LayerCase, build, trainable

# The layer suite's methods, in the order the report lists them.
HOST_METHODS = ("dense_floor", "fura", "qfura", "fura_peft", "fura_peft_nf4", "lora_r32", "qlora_r32")
HOST_CONFIGURATIONS = ("fair", "fp32")
# Pairs whose ratios the targets read (numerator, denominator).
TARGET_PAIRS = {"fura": "lora_r32", "qfura": "qlora_r32", "fura_peft": "lora_r32", "fura_peft_nf4": "qlora_r32"}

# A Llama with Llama-3-8B's depth (32 decoder layers, all seven projections) and tiny widths: the
# host work of a step is per module and per op, so the layer count and the kinds of layers are
# what matter, while the arithmetic stays a few microseconds an op. The ratios mirror the 8B
# model: 4 query heads to 1 key/value head, 4x MLP; 32 tokens, so that k and v (16 wide) merge on
# the weight side and the other projections take the activation side, as at 8B with 2048 tokens.
# (QFuRA's NF4 GEMM then takes its fused small-T kernel, where 2048 tokens dequantise and call
# cuBLAS: one launch fewer.)
HOST_MODEL = dict(
    name="llama3-8b-depth-tiny",
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=32,
    num_attention_heads=4,
    num_key_value_heads=1,
    vocab_size=256,
    batch=1,
    seq=32,
)
# The layer suite's shapes: that model's projections (FuRA's blocks from its default
# factorisation, `closest_factor_pair(in_features)`).
HOST_LAYERS = [
    LayerCase("tiny.q_proj", 64, 64, 8, 8),
    LayerCase("tiny.k_proj", 64, 16, 8, 8),
    LayerCase("tiny.gate_proj", 64, 256, 8, 8),
    LayerCase("tiny.down_proj", 256, 64, 16, 16),
]
MODEL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Rounds:
    """How many calls a measurement takes: `warmup` first, then `rounds` rounds of `reps`."""

    warmup: int
    reps: int
    rounds: int


LAYER_ROUNDS = Rounds(warmup=30, reps=200, rounds=7)
MODEL_ROUNDS = Rounds(warmup=3, reps=15, rounds=5)


def call_counts(fn: Callable[[], object]) -> dict:
    """Python-level and C-level calls one `fn()` makes, as `sys.setprofile` sees them ('call'
    events, generators' resumptions included, and 'c_call' events); `fn` itself is not counted."""
    counts = {"call": 0, "c_call": 0}

    def profile(frame, event, arg):
        if event in counts:
            counts[event] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {"python_calls": counts["call"] - 1, "c_calls": counts["c_call"] - 1}  # fn's frame, setprofile(None)


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / min(values) if values else 0.0


@dataclass
class Timed:
    """A call to time, and what to do before each call, untimed (drop the gradients it made)."""

    run: Callable[[], object]
    reset: Callable[[], object]


def interleaved_times(calls: dict, rounds: Rounds) -> dict:
    """Host time per call of each `Timed` entry of `calls`, in microseconds, measured in turns:
    every round times each entry's `reps` calls, one entry after the other. Per entry: the fastest
    round's median (`median_us`), that round's 20th and 80th percentiles, every round's median and
    their spread ((max - min) / min)."""
    for timed in calls.values():
        for _ in range(rounds.warmup):
            timed.reset()
            timed.run()
    per_round: dict = {name: [] for name in calls}
    for _ in range(rounds.rounds):
        for name, timed in calls.items():
            run, reset = timed.run, timed.reset
            times = []
            for _ in range(rounds.reps):
                reset()
                start = time.perf_counter_ns()
                run()
                times.append((time.perf_counter_ns() - start) / 1e3)
            per_round[name].append(sorted(times))
    out = {}
    for name, rounds_times in per_round.items():
        medians = [statistics.median(t) for t in rounds_times]
        best = rounds_times[medians.index(min(medians))]
        out[name] = {
            "median_us": min(medians),
            "p20_us": best[len(best) // 5],
            "p80_us": best[(4 * len(best)) // 5],
            "round_medians_us": medians,
            "spread": _spread(medians),
            "reps": rounds.reps,
            "rounds": rounds.rounds,
        }
    return out


def _dtype(configuration: str) -> torch.dtype:
    return torch.bfloat16 if configuration == "fair" else torch.float32


def _autocast(configuration: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=configuration == "fair")


def _layer_calls(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, configuration: str) -> tuple[Timed, Timed]:
    """(forward + backward, step) of one layer. The gradients a call made are dropped before the
    next, untimed, except in the step, where `zero_grad` is part of what a training loop runs."""
    params = trainable(module)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    autocast = _autocast(configuration)

    def forward_backward() -> None:
        with autocast:
            y = module(x)
        y.backward(dy)

    def drop_grads() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    def step() -> None:
        with autocast:
            y = module(x)
        y.backward(dy)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def drop_input_grad() -> None:
        x.grad = None

    return Timed(forward_backward, drop_grads), Timed(step, drop_input_grad)


def layer_suite(emit, rounds: Rounds = LAYER_ROUNDS, cases=HOST_LAYERS, methods=HOST_METHODS,
                configurations=HOST_CONFIGURATIONS) -> None:  # fmt: skip
    """One record per (case, configuration, method) with its forward + backward and its step."""
    from fura_kernels.triton import launch_only

    device = torch.device("cpu")
    for case in cases:
        for configuration in configurations:
            dtype = _dtype(configuration)
            torch.manual_seed(0)
            x = torch.randn(HOST_MODEL["seq"], case.in_features, dtype=dtype, requires_grad=True)
            dy = torch.randn(HOST_MODEL["seq"], case.out_features, dtype=dtype)
            built, calls, skipped = {}, {}, {}
            for method in methods:
                try:
                    module = build(method, case, dtype, device, configuration)
                    built[method] = _layer_calls(module, x, dy, configuration)
                except Exception as err:  # noqa: BLE001 - a method that cannot run is a result
                    skipped[method] = f"{type(err).__name__}: {err}"[:300]
            for method, (forward_backward, step) in built.items():
                calls[(method, "forward_backward")] = forward_backward
                calls[(method, "step")] = step
            times = interleaved_times(calls, rounds)
            for method in methods:
                record = {"suite": "host", "name": "layer", "method": method, "tokens": HOST_MODEL["seq"],
                          "dtype": str(dtype).removeprefix("torch."), "shape": asdict(case),
                          "configuration": configuration, "time_ms": None}  # fmt: skip
                if method in skipped:
                    emit({**record, "skipped": skipped[method]})
                    continue
                forward_backward, step = built[method]
                forward_backward.reset()
                start = launch_only.launch_count()
                counts = call_counts(forward_backward.run)
                launches = launch_only.launches(start)
                step.reset()
                step_counts = call_counts(step.run)
                fb, st = times[(method, "forward_backward")], times[(method, "step")]
                emit({**record, "time_ms": _as_ms(fb), "host_us": fb, "step_host_us": st, **counts,
                      "triton_launches": [launch.name for launch in launches], "step_calls": step_counts})  # fmt: skip
            del built, calls
            gc.collect()


def _as_ms(t: dict) -> dict:
    """A host time in the results schema's shape (milliseconds)."""
    return {"median": t["median_us"] / 1e3, "p20": t["p20_us"] / 1e3, "p80": t["p80_us"] / 1e3, "reps": t["reps"]}


def tiny_llama(spec: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in spec.items() if k not in ("name", "batch", "seq")}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=max(128, spec["seq"])))
    return model.to(dtype)


def model_for(method: str, spec: dict, dtype: torch.dtype) -> nn.Module:
    """The whole tiny Llama prepared for `method` as its users prepare it."""
    from peft import LoraConfig, get_peft_model

    from fura_kernels import convert_to_fura
    from fura_kernels.recipes.baselines import quantize_linears_bnb

    model = tiny_llama(spec, dtype)
    if method == "dense_floor":  # the frozen base: backward still runs every layer's dx
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif method in ("fura", "qfura"):
        convert_to_fura(model, MODEL_TARGETS, quantize="nf4" if method == "qfura" else None, progress=False)
    elif method in ("lora_r32", "qlora_r32"):
        if method == "qlora_r32":
            quantize_linears_bnb(model, MODEL_TARGETS)
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=MODEL_TARGETS))
    elif method in ("fura_peft", "fura_peft_nf4"):
        from fura_kernels.peft import FuRAPeftConfig

        if method == "fura_peft_nf4":
            quantize_linears_bnb(model, MODEL_TARGETS)
        model = get_peft_model(model, FuRAPeftConfig(target_modules=MODEL_TARGETS, progress_bar=False))
    else:
        raise ValueError(f"bench.host: unknown method {method!r}; expected one of {HOST_METHODS}")
    model.train()
    return model


def _model_calls(model: nn.Module, ids: torch.Tensor, configuration: str) -> tuple[Timed, Timed]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None
    autocast = _autocast(configuration)

    def forward_backward() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    def drop_grads() -> None:
        for p in params:
            p.grad = None

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return Timed(forward_backward, drop_grads), Timed(step, lambda: None)


def model_suite(emit, rounds: Rounds = MODEL_ROUNDS, spec: dict = HOST_MODEL, methods=HOST_METHODS,
                configurations=HOST_CONFIGURATIONS) -> None:  # fmt: skip
    from fura_kernels.triton import launch_only

    for configuration in configurations:
        dtype = _dtype(configuration)
        ids = torch.randint(
            0, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0)
        )
        built, calls, skipped = {}, {}, {}
        for method in methods:
            try:
                built[method] = _model_calls(model_for(method, spec, dtype), ids, configuration)
            except Exception as err:  # noqa: BLE001
                skipped[method] = f"{type(err).__name__}: {err}"[:300]
        for method, (forward_backward, step) in built.items():
            calls[(method, "forward_backward")] = forward_backward
            calls[(method, "step")] = step
        times = interleaved_times(calls, rounds)
        model_info = {"name": spec["name"], "hidden_size": spec["hidden_size"], "layers": spec["num_hidden_layers"],
                      "batch": spec["batch"], "seq": spec["seq"], "projections": MODEL_TARGETS}  # fmt: skip
        for method in methods:
            record = {"suite": "host", "name": "model", "method": method, "tokens": spec["batch"] * spec["seq"],
                      "dtype": str(dtype).removeprefix("torch."), "shape": None, "model": model_info,
                      "configuration": configuration, "time_ms": None}  # fmt: skip
            if method in skipped:
                emit({**record, "skipped": skipped[method]})
                continue
            forward_backward, step = built[method]
            forward_backward.reset()
            start = launch_only.launch_count()
            counts = call_counts(forward_backward.run)
            triton_launches = launch_only.launch_count() - start
            fb, st = times[(method, "forward_backward")], times[(method, "step")]
            emit({**record, "time_ms": _as_ms(fb), "host_us": fb, "step_host_us": st, **counts,
                  "triton_launch_count": triton_launches})  # fmt: skip
        del built, calls
        gc.collect()
