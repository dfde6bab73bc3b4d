"""The host side of a training step: `python -m bench host`.

What a GPU waits on when a step is host-bound is the Python and C work of issuing it. This suite
measures that work on any machine, in launch-only mode (`FURA_LAUNCH_ONLY=1`, see
`fura_kernels.triton.launch_only`): fura-kernels' Triton kernels compile for an H100 and every
launch runs Triton's whole launch path up to the driver's launch call, which does nothing; every
other operation (PyTorch's own, bitsandbytes', PEFT's) runs for real on CPU tensors, at widths so
small that its arithmetic costs about what a GPU launch costs the host. One CPU thread: a GPU's
host thread runs no operator on a thread pool, and OpenMP's spinning workers would otherwise be
most of what is counted.

Per method it records, for one layer's forward + backward (the primary figure: a model runs one
optimizer step for all its tensors) and beside it the layer's step with `AdamW(fused=True)`, and
for a whole-model SFT step (a Llama with Llama-3-8B's 32 decoder layers and all seven
projections, at tiny widths, with and without the optimizer step):

- host time in microseconds: calls of every method interleaved one by one, round after round, so
  a drift of the machine touches them alike; the fastest round's median (the least disturbed
  estimate of the work), that round's 20th and 80th percentiles, and the spread of the round
  medians ((max - min) / min);
- Python-level and C-level calls of one call (`sys.setprofile` events);
- with `--instructions`, the instructions one call executes, counted by valgrind's callgrind
  (repeatable to a few parts in ten thousand, whatever else the machine does).

Methods: the frozen dense layer (the floor: forward and dx), FuRA, QFuRA, FuRA's PEFT form on a
plain and on an NF4 base, PEFT LoRA r=32 and QLoRA r=32, built as `bench.methods` builds them
(the PEFT ones measured as their tuner layer, as a model runs it; PEFT's model wrapper runs once
per model call, in the whole-model records). Configurations:

- `fair`: what HF Trainer does with `bf16=True` (bf16 base, fp32 trainables, bf16 autocast, fused
  AdamW), as users run every method;
- `fp32`: everything fp32, no autocast. A CPU's bf16 matmul costs 20 µs or more whatever its size
  (oneDNN's set-up), ten times a GPU launch's host cost, so under `fair` the CPU charges each
  method for its matmul count; in fp32 an op of these sizes costs 1-3 µs, as a launch does.

What the proxy leaves out: the driver's own launch call (a few microseconds on a GPU, for every
kernel of every method), and on the other side the few microseconds of arithmetic the CPU does
for each PyTorch op, where a GPU only launches.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HOST_METHODS = ("dense_floor", "fura", "qfura", "fura_peft", "fura_peft_nf4", "lora_r32", "qlora_r32")
HOST_CONFIGURATIONS = ("fair", "fp32")
# Each FuRA form against the method it replaces (the targets read these ratios).
BASELINE_OF = {"fura": "lora_r32", "qfura": "qlora_r32", "fura_peft": "lora_r32", "fura_peft_nf4": "qlora_r32"}

# A Llama with Llama-3-8B's depth (32 decoder layers, all seven projections) and tiny widths: the
# host work of a step is per module and per op, so the layer count and the kinds of layers are what
# matter, while each op's arithmetic stays a few microseconds. Its ratios mirror the 8B model's:
# 4 query heads to 2 key/value heads (k and v half as wide as q, so FuRA's R stays the smaller
# core there), a 3x MLP; 24 tokens, so k and v (16 wide) merge on the weight side and the other
# projections take the activation side, as the 8B model does at 2048 tokens. QFuRA's NF4 GEMMs
# dequantise and call the GEMM, as at 2048 tokens (rows of 32 and 96 values take that path).
HOST_MODEL = dict(
    name="llama3-8b-depth-tiny",
    hidden_size=32,
    intermediate_size=96,
    num_hidden_layers=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    batch=1,
    seq=24,
)
MODEL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Rounds:
    """How many calls a measurement takes: `warmup` first, then `rounds` rounds of `reps`."""

    warmup: int
    reps: int
    rounds: int


LAYER_ROUNDS = Rounds(warmup=50, reps=200, rounds=7)
MODEL_ROUNDS = Rounds(warmup=3, reps=12, rounds=5)
QUICK_LAYER_ROUNDS = Rounds(warmup=5, reps=20, rounds=2)
QUICK_MODEL_ROUNDS = Rounds(warmup=1, reps=2, rounds=2)
# Calls counted under callgrind (instructions are repeatable: a few suffice).
COUNTED_CALLS = {"layer": 20, "model": 3}


@dataclass
class Timed:
    """A call to time, and what to do before each call, untimed (drop the gradients it made)."""

    run: Callable[[], object]
    reset: Callable[[], object]


def layer_cases():
    """The tiny model's projections (FuRA's blocks from its default factorisation)."""
    from fura_kernels import closest_factor_pair

    from .methods import LayerCase

    hidden, inter = HOST_MODEL["hidden_size"], HOST_MODEL["intermediate_size"]
    kv = hidden * HOST_MODEL["num_key_value_heads"] // HOST_MODEL["num_attention_heads"]
    shapes = (
        ("q_proj", hidden, hidden),
        ("k_proj", hidden, kv),
        ("gate_proj", hidden, inter),
        ("down_proj", inter, hidden),
    )
    return [LayerCase(f"tiny.{name}", i, o, *closest_factor_pair(i)) for name, i, o in shapes]


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


def interleaved_times(calls: dict, rounds: Rounds) -> dict:
    """Host time per call of each `Timed` entry of `calls`, in microseconds. Every round runs the
    entries in turn, one call each, `reps` times over: a disturbance of the machine lands on all
    of them alike. Per entry: the fastest round's median (`median_us`), its 20th and 80th
    percentiles, every round's median and their spread ((max - min) / min)."""
    entries = list(calls.items())
    for _ in range(rounds.warmup):
        for _, timed in entries:
            timed.reset()
            timed.run()
    per_round: dict = {name: [] for name in calls}
    clock = time.perf_counter_ns
    for _ in range(rounds.rounds):
        samples: dict = {name: [] for name in calls}
        for _ in range(rounds.reps):
            for name, timed in entries:
                timed.reset()
                start = clock()
                timed.run()
                samples[name].append((clock() - start) / 1e3)
        for name, times in samples.items():
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
            "spread": (max(medians) - min(medians)) / min(medians),
            "reps": rounds.reps,
            "rounds": rounds.rounds,
        }
    return out


def _dtype(configuration: str):
    import torch

    return torch.bfloat16 if configuration == "fair" else torch.float32


def _autocast(configuration: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=configuration == "fair")


def _as_ms(t: dict) -> dict:
    """A host time in the results schema's shape (milliseconds)."""
    return {"median": t["median_us"] / 1e3, "p20": t["p20_us"] / 1e3, "p80": t["p80_us"] / 1e3, "reps": t["reps"]}


# --- layers ---------------------------------------------------------------------------------
def layer_module(method: str, case, configuration: str):
    """The layer as a model runs it: PEFT's tuner layer itself (not PEFT's model wrapper)."""
    import torch

    from .methods import build

    module = build(method, case, _dtype(configuration), torch.device("cpu"), configuration)
    if hasattr(module, "base_model"):  # a PeftModel around bench.methods' holder: its layer is .proj
        module = module.base_model.model.proj
    return module


def layer_calls(module, x, dy, configuration: str) -> tuple[Timed, Timed]:
    """(forward + backward, step) of one layer. The gradients a call made are dropped before the
    next, untimed, except in the step, where `zero_grad` is part of what a training loop runs."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
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


def layer_inputs(case, configuration: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    dtype = _dtype(configuration)
    tokens = HOST_MODEL["seq"]
    x = torch.randn(tokens, case.in_features, generator=generator).to(dtype).requires_grad_()
    dy = torch.randn(tokens, case.out_features, generator=generator).to(dtype)
    return x, dy


def layer_suite(emit, rounds: Rounds, methods=HOST_METHODS, configurations=HOST_CONFIGURATIONS) -> None:
    """One record per (layer case, configuration, method): forward + backward and step."""
    from fura_kernels.triton import launch_only

    for case in layer_cases():
        for configuration in configurations:
            x, dy = layer_inputs(case, configuration)
            built, calls, skipped = {}, {}, {}
            for method in methods:
                try:
                    built[method] = layer_calls(layer_module(method, case, configuration), x, dy, configuration)
                except Exception as err:  # noqa: BLE001 - a method that cannot run is a result
                    skipped[method] = f"{type(err).__name__}: {err}"[:300]
            for method, (forward_backward, step) in built.items():
                calls[(method, "forward_backward")] = forward_backward
                calls[(method, "step")] = step
            times = interleaved_times(calls, rounds)
            for method in methods:
                record = {"suite": "host", "name": "layer", "method": method, "tokens": HOST_MODEL["seq"],
                          "dtype": str(_dtype(configuration)).removeprefix("torch."), "shape": asdict(case),
                          "configuration": configuration, "time_ms": None}  # fmt: skip
                if method in skipped:
                    emit({**record, "skipped": skipped[method]})
                    continue
                forward_backward, step = built[method]
                forward_backward.reset()
                start = launch_only.launch_count()
                counts = call_counts(forward_backward.run)
                launched = [launch.name for launch in launch_only.launches(start)]
                step.reset()
                step_counts = call_counts(step.run)
                fb, st = times[(method, "forward_backward")], times[(method, "step")]
                emit({**record, "time_ms": _as_ms(fb), "host_us": fb, "step_host_us": st, **counts,
                      "step_python_calls": step_counts["python_calls"], "step_c_calls": step_counts["c_calls"],
                      "triton_launches": launched})  # fmt: skip
            del built, calls
            gc.collect()


# --- the whole model ------------------------------------------------------------------------
def tiny_llama(dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in HOST_MODEL.items() if k not in ("name", "batch", "seq")}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=128))
    return model.to(dtype)


def model_for(method: str, dtype):
    """The tiny Llama prepared for `method` as its users prepare it."""
    from .methods import ADAPTED_METHODS, adapt_model

    model = tiny_llama(dtype)
    if method == "dense_floor":  # the frozen base: the backward still runs every layer's dx
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif method in ADAPTED_METHODS:
        model = adapt_model(model, method, MODEL_TARGETS)
    else:
        raise ValueError(f"bench.host: unknown method {method!r}; expected one of {HOST_METHODS}")
    model.train()
    return model


def model_calls(model, ids, configuration: str) -> tuple[Timed, Timed]:
    import torch

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


def model_ids():
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, HOST_MODEL["vocab_size"], (HOST_MODEL["batch"], HOST_MODEL["seq"]), generator=generator)


def model_info() -> dict:
    return {"name": HOST_MODEL["name"], "hidden_size": HOST_MODEL["hidden_size"],
            "layers": HOST_MODEL["num_hidden_layers"], "batch": HOST_MODEL["batch"], "seq": HOST_MODEL["seq"],
            "projections": MODEL_TARGETS}  # fmt: skip


def model_suite(emit, rounds: Rounds, methods=HOST_METHODS, configurations=HOST_CONFIGURATIONS) -> None:
    from fura_kernels.triton import launch_only

    ids = model_ids()
    for configuration in configurations:
        dtype = _dtype(configuration)
        built, calls, skipped = {}, {}, {}
        for method in methods:
            try:
                built[method] = model_calls(model_for(method, dtype), ids, configuration)
            except Exception as err:  # noqa: BLE001
                skipped[method] = f"{type(err).__name__}: {err}"[:300]
        for method, (forward_backward, step) in built.items():
            calls[(method, "forward_backward")] = forward_backward
            calls[(method, "step")] = step
        times = interleaved_times(calls, rounds)
        for method in methods:
            tokens = HOST_MODEL["batch"] * HOST_MODEL["seq"]
            record = {"suite": "host", "name": "model", "method": method, "tokens": tokens,
                      "dtype": str(dtype).removeprefix("torch."), "shape": None, "model": model_info(),
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


# --- instructions (callgrind) ---------------------------------------------------------------
CALLGRIND_MARKS = r"""
#include <valgrind/callgrind.h>
void fura_marks_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void fura_marks_stop(void) { CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _marks_library(folder: Path) -> Path:
    source, library = folder / "marks.c", folder / "libfuramarks.so"
    source.write_text(CALLGRIND_MARKS)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    return library


def counted_calls(marks) -> list[tuple[tuple, Timed, int]]:
    """(key, call, count) of every measurement, in a fixed order (the dumps are read in it)."""
    ids = model_ids()
    out = []
    for configuration in HOST_CONFIGURATIONS:
        for case in layer_cases():
            x, dy = layer_inputs(case, configuration)
            for method in HOST_METHODS:
                forward_backward, step = layer_calls(layer_module(method, case, configuration), x, dy, configuration)
                out.append((("layer", case.name, configuration, method), forward_backward, COUNTED_CALLS["layer"]))
        for method in HOST_METHODS:
            forward_backward, step = model_calls(model_for(method, _dtype(configuration)), ids, configuration)
            out.append((("model", None, configuration, method), forward_backward, COUNTED_CALLS["model"]))
            out.append((("model_step", None, configuration, method), step, COUNTED_CALLS["model"]))
    return out


def _count_instructions_here(dump_list: Path) -> None:
    """Under callgrind: run every measurement between the marks; write the keys, in order."""
    import json

    library = ctypes.CDLL(os.environ["FURA_MARKS_LIBRARY"])
    keys = []
    for key, timed, count in counted_calls(library):
        for _ in range(3):  # warm-up: launch plans made, caches filled
            timed.reset()
            timed.run()
        library.fura_marks_start()
        for _ in range(count):
            timed.reset()
            timed.run()
        library.fura_marks_stop()
        keys.append([*key, count])
    dump_list.write_text(json.dumps(keys))


def count_instructions() -> dict:
    """{(kind, case, configuration, method): instructions per call}, from a child process run
    under valgrind's callgrind with instrumentation only between the marks (the resets between
    calls are counted too: a few hundred instructions against hundreds of thousands)."""
    import json

    if shutil.which("valgrind") is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        raise RuntimeError("--instructions needs valgrind and its headers (Debian: valgrind)")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        env = dict(os.environ, FURA_MARKS_LIBRARY=str(_marks_library(folder)), OMP_NUM_THREADS="1")
        out_file, keys_file = folder / "callgrind.out", folder / "keys.json"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
                   sys.executable, "-m", "bench.host", "--count-instructions-into", str(keys_file)]  # fmt: skip
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        keys = json.loads(keys_file.read_text())
        counts = {}
        for index, (*key, calls) in enumerate(keys, start=1):
            text = Path(f"{out_file}.{index}").read_text()
            total = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("totals:"))
            counts[tuple(key)] = total / calls
        return counts


# --- the run --------------------------------------------------------------------------------
def _attach_instructions(records: list[dict], counts: dict) -> None:
    for record in records:
        if record.get("time_ms") is None:
            continue
        case = record["shape"]["name"] if record["name"] == "layer" else None
        key = (record["name"], case, record["configuration"], record["method"])
        if key in counts:
            record["instructions"] = counts[key]
        if record["name"] == "model" and ("model_step", None, record["configuration"], record["method"]) in counts:
            record["step_instructions"] = counts[("model_step", None, record["configuration"], record["method"])]


HOST_NOTE = (
    "Launch-only run: fura-kernels' Triton kernels compiled for sm_90 and launched through Triton's whole launch "
    "path up to the driver's launch call, which does nothing; every other op ran on CPU tensors at tiny widths, one "
    "thread. Host work only: these figures say nothing about GPU kernel time."
)


def run(argv: list[str] | None = None) -> Path:
    """Parse `argv`, run the suite in launch-only mode, write and report the results file."""
    parser = argparse.ArgumentParser(prog="python -m bench host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run; its spread is large)")
    parser.add_argument("--only", choices=("layers", "model"), help="one half of the suite")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per call with valgrind's callgrind (a few minutes)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("fura-bench-results"), help="results root")
    parser.add_argument("--results-file", type=Path, help="write the results exactly here")
    parser.add_argument("--readme", type=Path, help="also rewrite this README's host table")
    parser.add_argument("--count-instructions-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _launch_only_or_restart(argv)
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*not a multiple of 64.*")  # NF4 rows of 32: dequantise, as at 2048 T
    if args.count_instructions_into:
        _count_instructions_here(args.count_instructions_into)
        raise SystemExit(0)
    from . import environment, results
    from .suites import ceilings

    device = torch.device("cpu")
    header = {"schema_version": 1, "profile": "host-quick" if args.quick else "host", "suites": ["host"],
              "environment": environment.describe(device), "note": HOST_NOTE,
              "host_model": HOST_MODEL}  # fmt: skip
    path = args.results_file or results.default_path(header, args.out)
    stream = results.ResultsStream(path, header)
    c, info = ceilings(device, torch.float32, quick=True)
    stream.set_ceilings(info)
    layer_rounds, model_rounds = (
        (QUICK_LAYER_ROUNDS, QUICK_MODEL_ROUNDS) if args.quick else (LAYER_ROUNDS, MODEL_ROUNDS)
    )
    if args.only in (None, "layers"):
        layer_suite(stream.add, layer_rounds)
    if args.only in (None, "model"):
        model_suite(stream.add, model_rounds)
    if args.instructions:
        _attach_instructions(stream.records, count_instructions())
    stream.finish()
    from .report import host_table, update_readme

    text = host_table(stream.results, path.as_posix())
    print(f"results: {path}")
    print(text)
    if args.readme:
        update_readme(args.readme, text, "host")
    return path


def _launch_only_or_restart(argv: list[str] | None) -> None:
    """Launch-only mode is read when fura_kernels is imported: set it, or, if the package was
    imported without it, run this command again in a process of its own that has it."""
    from_launch_only = os.environ.get("FURA_LAUNCH_ONLY") == "1"
    if "fura_kernels" not in sys.modules:
        os.environ["FURA_LAUNCH_ONLY"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        return
    if from_launch_only:
        return
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ, FURA_LAUNCH_ONLY="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    raise SystemExit(subprocess.call([sys.executable, "-m", "bench.host", *argv], env=env))


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
