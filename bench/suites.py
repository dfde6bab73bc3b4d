"""The benchmark suites: ceilings, kernels, layer steps, whole-model SFT steps, serving.

Each suite hands its result records (plain dicts, schema in `bench/results_schema.json`) one by
one to an `emit` callback, which writes the results file again, so a run cut short keeps them.
Shapes and token counts come from a profile (`PROFILES`): `full` and `quick` use the
Llama-3-8B and Qwen3-1.7B projections on a GPU; on a CPU the same code runs the `cpu-*`
profiles, shapes divided by 16, whose figures say nothing about GPU speed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
from tqdm.auto import tqdm

from fura_kernels import convert_to_fura
from fura_kernels.nf4 import NF4Tensor, quantize_nf4
from fura_kernels.recipes.common import enable_activation_checkpointing
from fura_kernels.triton import block_diag_matmul, block_diag_matmul_backward
from fura_kernels.triton.nf4_ops import SMALL_T_MAX, nf4_dequantize, nf4_matmul

from . import floors
from .floors import Ceilings
from .methods import (
    ADAPTED_METHODS,
    CONFIGURATIONS,
    METHODS,
    MODEL_TARGETS,
    LayerCase,
    adapt_model,
    autocast_dtype,
    build,
    make_step,
    trainable,
)
from .serving import serve_suite, serve_units
from .timing import (
    graph_replay,
    kernel_profile,
    measure,
    measure_graph,
    measure_replay,
    measure_until_steady,
    peak_memory,
    saved_for_backward_bytes,
)

LLAMA3_8B = [
    LayerCase("llama3-8b.q_proj", 4096, 4096, 64, 64),
    LayerCase("llama3-8b.k_proj", 4096, 1024, 64, 64),
    LayerCase("llama3-8b.o_proj", 4096, 4096, 32, 128),
    LayerCase("llama3-8b.gate_proj", 4096, 14336, 64, 64),
    LayerCase("llama3-8b.down_proj", 14336, 4096, 112, 128),
]
QWEN3_1_7B = [
    LayerCase("qwen3-1.7b.q_proj", 2048, 2048, 32, 64),
    LayerCase("qwen3-1.7b.o_proj", 2048, 2048, 16, 128),
    LayerCase("qwen3-1.7b.gate_proj", 2048, 6144, 32, 64),
    LayerCase("qwen3-1.7b.down_proj", 6144, 2048, 64, 96),
]


# The kernel suite's measurements: K1 and K3 and the NF4 GEMM at each T, the weight-side merge
# and the NF4 dequantisation once per shape. The NF4 GEMM is `nf4_small_t_gemm` (decode and
# fused kernels, against bitsandbytes' inference path) up to SMALL_T_MAX tokens and
# `nf4_dequant_gemm` (the training path) above.
KERNELS = ("K1", "K3", "weight_merge", "nf4_dequant", "nf4_small_t_gemm", "nf4_dequant_gemm")
# The methods the whole-model suite runs (the layer suite runs all of METHODS).
# Methods that run FuRA's algorithm (either form), measured against its own floor.
FURA_METHODS = ("fura", "fura_peft", "qfura", "fura_peft_nf4", "reference")
MODEL_METHODS = ("fura", "fura_peft", "qfura", "fura_peft_nf4", "lora_r32", "qlora_r32", "full_ft")


def scaled(case: LayerCase, factor: int) -> LayerCase:
    """The same layer with every dimension divided by `factor` (for CPU runs)."""
    n = max(1, case.n // factor)
    b = case.in_features // factor // n
    return LayerCase(f"{case.name}/{factor}", n * b, case.out_features // factor, n, b)


@dataclass
class Profile:
    name: str
    cases: list[LayerCase]
    tokens: list[int]
    methods: tuple[str, ...] = METHODS
    warmup: int = 3
    reps: int = 10
    input_sets: int = 3  # rotated so the caches are not what is measured
    models: list[dict] = field(default_factory=list)  # Llama shapes for the whole-model suite
    # Weight-bound kernels (NF4 dequant and GEMMs, the weight-side merge) rotate copies of their
    # weights adding up to this many bytes: at least twice an H100's 50 MB L2, so each call reads
    # its weights from HBM, as a model's next layer does (one set reused let graph replays beat
    # the HBM floor). 0: no rotation (the CPU profiles, which say nothing about GPU speed).
    rotate_bytes: int = 128 << 20
    configurations: tuple[str, ...] = CONFIGURATIONS  # see bench.methods
    graphed: bool = True  # also time whole steps as CUDA-graph replays (GPU)
    kernels: tuple[str, ...] = KERNELS  # which kernel measurements the kernel suite takes
    checkpointing: tuple[bool, ...] = (False, True)  # whole-model runs without / with activation checkpointing
    model_timings: tuple[str, ...] = ("eager", "compiled")  # whole-model runs eagerly / under torch.compile
    compile_backend: str = "inductor"  # torch.compile's backend for the compiled runs
    compile_mode: str | None = None  # torch.compile's mode (say "reduce-overhead": CUDA graphs); None: its default
    # Whole-model runs without / with Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear
    # cross-entropy, applied as HF Trainer's `use_liger_kernel=True` applies them.
    liger: tuple[bool, ...] = (False,)
    # Whole-model repetitions: at least `model_min_reps`, then more until the p20-p80 spread is
    # under timing.SPREAD_TARGET, at most `model_max_reps` (the record says whether it got there).
    model_min_reps: int = 10
    model_max_reps: int = 40
    # FuRA's whole-model runs on random cores built on the meta device (no SVD: a conversion
    # says nothing about the step), with one real conversion timed on its own afterwards.
    random_cores: bool = False
    # Layer shapes (substrings of their names; "" matches all) whose records are cross-checked
    # against torch.profiler's account of the device, eager and graphed (GPU only).
    kernel_profile: tuple[str, ...] = ("",)
    # False: no FLOP, launch or saved-bytes passes and no second ceiling measurement (a timed GPU
    # call, where every second counts: the CPU tests check those counts, which the device does
    # not change).
    counts: bool = True
    # The serving suite (bench/serving.py): model shape, batches, adapter counts, prefill tokens a
    # sequence, decode context; None: the profile has no serving runs.
    serve: dict | None = None


TINY_MODEL = dict(
    name="tiny-llama",
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    batch=2,
    seq=32,
)
SMALL_MODEL = dict(
    name="small-llama",
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    batch=2,
    seq=128,
)
LLAMA3_8B_MODEL = dict(
    name="llama3-8b",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    batch=1,
    seq=2048,
)
# Llama-3-8B's widths with 4 decoder layers: a whole model's step (embedding, attention, loss)
# compiled in seconds, where 32 layers would spend the budget compiling.
LLAMA3_8B_4_LAYERS = dict(LLAMA3_8B_MODEL, name="llama3-8b-4-layers", num_hidden_layers=4)
# Llama-3.2-1B's shape: where the 8B model does not fit (full fine-tuning, say), this one does.
LLAMA3_1B_MODEL = dict(
    LLAMA3_8B_MODEL, name="llama3.2-1b", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16
)
# The micro-batches users train with: 1 x 2048 and 4 x 2048 tokens.
LLAMA3_8B_MODEL_X4 = dict(LLAMA3_8B_MODEL, batch=4)
LLAMA3_1B_MODEL_X4 = dict(LLAMA3_1B_MODEL, batch=4)

# Serving (mixed-adapter batches): Llama-3-8B's widths with two decoder layers (a layer's cost is
# what adapters change; 32 layers would only multiply it), batches of 16 and 64 sequences.
SERVE_GPU = dict(model=dict(LLAMA3_8B_MODEL, num_hidden_layers=2, name="llama3-8b/2-layers"), batches=(16, 64),
                 adapters=(1, 4, 16), prefill=512, context=512)  # fmt: skip
SERVE_CPU = dict(model=SMALL_MODEL, batches=(16, 64), adapters=(1, 4, 16), prefill=32, context=32)
SERVE_TINY = dict(model=TINY_MODEL, batches=(16,), adapters=(1, 4), prefill=8, context=8)

PROFILES = {
    "full": Profile(
        "full",
        LLAMA3_8B + QWEN3_1_7B,
        [1, 16, 512, 2048, 8192, 16384],
        models=[LLAMA3_8B_MODEL, LLAMA3_8B_MODEL_X4, LLAMA3_1B_MODEL, LLAMA3_1B_MODEL_X4],
        liger=(False, True),
        random_cores=True,
        serve=SERVE_GPU,
    ),
    "quick": Profile(
        "quick",
        [LLAMA3_8B[0], LLAMA3_8B[4]],
        [16, 2048, 8192],
        reps=5,
        models=[LLAMA3_8B_MODEL, LLAMA3_1B_MODEL],
        random_cores=True,
        serve=SERVE_GPU,
    ),
    # Real widths (Qwen3-1.7B's q and down projections) and few tokens: compute, not Python,
    # dominates a step, so the CPU's FuRA/LoRA ratio says something; under 2 minutes on 2 cores.
    "cpu-quick": Profile(
        "cpu-quick",
        [QWEN3_1_7B[0], QWEN3_1_7B[3]],
        [16, 64],
        warmup=2,
        reps=5,
        input_sets=2,
        models=[SMALL_MODEL],
        rotate_bytes=0,
        configurations=("fair",),
        model_timings=("eager",),
        model_min_reps=5,
        model_max_reps=20,
        serve=SERVE_CPU,
    ),
    "cpu-tiny": Profile(
        "cpu-tiny",
        [scaled(LLAMA3_8B[0], 32)],
        [1, 64],
        warmup=1,
        reps=2,
        input_sets=2,
        models=[TINY_MODEL],
        rotate_bytes=0,
        model_timings=("eager",),
        liger=(False, True),
        model_min_reps=3,
        model_max_reps=8,
        serve=SERVE_TINY,
    ),
}
# Whole-model shapes by name, for `--models NAME[:BATCHxSEQ]`.
MODELS = {spec["name"]: spec
          for spec in (TINY_MODEL, SMALL_MODEL, LLAMA3_8B_MODEL, LLAMA3_8B_4_LAYERS, LLAMA3_1B_MODEL)}  # fmt: skip


def model_spec(text: str) -> dict:
    """`llama3-8b` or `llama3-8b:4x2048`: a model of MODELS, with its micro-batch changed."""
    name, _, size = text.partition(":")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    spec = dict(MODELS[name])
    if size:
        batch, _, seq = size.partition("x")
        if not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 0):
            raise ValueError(f"model size {size!r} of {text!r} is not BATCHxSEQ (say 1x2048)")
        spec.update(batch=int(batch), seq=int(seq))
    return spec


def _rotating(fn, *inputs):
    """`step(i)` calling `fn` on the `i`-th of each list of rotated input sets (others as given)."""

    def step(i: int):
        return fn(*(x[i % len(x)] if isinstance(x, list) else x for x in inputs))

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- ceilings -------------------------------------------------------------------------------
def ceilings(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[Ceilings, dict]:
    """Peak matmul FLOP/s and copy bandwidth, measured here before anything else."""
    size = (8192 if not quick else 4096) if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm = measure(lambda i: torch.mm(a, b), device, warmup=3, reps=10)
    numel = (1 << 28 if device.type == "cuda" else 1 << 24) // a.element_size()
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    cp = measure(lambda i: dst.copy_(src), device, warmup=3, reps=10)
    c = Ceilings(
        matmul_flops=2 * size**3 / (mm["median"] * 1e-3),
        copy_bytes=2 * src.numel() * src.element_size() / (cp["median"] * 1e-3),
    )
    info = {"matmul_tflops": c.matmul_flops / 1e12, "matmul_shape": [size, size, size], "copy_gbps": c.copy_bytes / 1e9,
            "copy_bytes": 2 * src.numel() * src.element_size(), "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    return c, info


# At most this many weight copies per kernel (a small core would otherwise need thousands).
MAX_WEIGHT_SETS = 64


def _weight_sets(nbytes: int, profile: Profile) -> int:
    """How many copies of `nbytes` of weights to rotate: enough for `profile.rotate_bytes`."""
    if not profile.rotate_bytes:
        return 1
    return min(MAX_WEIGHT_SETS, max(1, -(-profile.rotate_bytes // max(nbytes, 1))))


def _time_kernel(fn, profile: Profile, device: torch.device, weight_sets: int = 1) -> tuple[dict, dict]:
    """(time, extra fields) of one kernel call. On a GPU the time is the CUDA-graph replay
    time, the kernel's own cost (a decode loop captures its kernels the same way), and the
    eagerly launched time, host launch overhead included, is kept beside it. The graph holds
    one call per rotated input or weight set, so every set is read in each replay."""
    eager = measure(fn, device, profile.warmup, profile.reps)
    graph = measure_graph(fn, device, 1, max(profile.reps, 10), max(profile.input_sets, weight_sets))
    how = {"weight_sets": weight_sets}
    if graph is None:
        return eager, {"timing": "eager", **how}
    return graph, {"timing": "cuda-graph", "eager_time_ms": eager, **how}


def _record(suite: str, name: str, method: str, case: LayerCase | None, tokens: int | None, dtype, t: dict, **extra):
    rec = {"suite": suite, "name": name, "method": method, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
           "shape": asdict(case) if case else None, "time_ms": t}  # fmt: skip
    rec.update(extra)
    return rec


def _rates(flops: float, nbytes: float, t_ms: float, floor_ms: float) -> dict:
    seconds = t_ms * 1e-3
    return {"tflops": flops / seconds / 1e12 if flops else None, "gbps": nbytes / seconds / 1e9,
            "floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / t_ms}  # fmt: skip


# --- kernels --------------------------------------------------------------------------------
def _bnb_functional():
    import bitsandbytes.functional

    return bitsandbytes.functional


def _bnb_nf4(core: torch.Tensor):
    """bitsandbytes' NF4 state (double quantisation) of `core`, or None where it cannot run."""
    if core.device.type != "cuda":
        return None
    try:
        return _bnb_functional().quantize_4bit(core, blocksize=64, quant_type="nf4", compress_statistics=True)
    except ImportError:
        return None


def _bnb_matmul_4bit(z: torch.Tensor, packed: torch.Tensor, quant_state) -> torch.Tensor:
    import bitsandbytes

    return bitsandbytes.matmul_4bit(z, packed.t(), quant_state=quant_state)


def _bnb_dequant_then_gemm(z: torch.Tensor, packed: torch.Tensor, quant_state) -> torch.Tensor:
    return z @ _bnb_functional().dequantize_4bit(packed, quant_state).t()


def kernel_suite(profile: Profile, device: torch.device, dtype: torch.dtype, c: Ceilings, bar, emit) -> None:
    """Each selected kernel measurement (`profile.kernels`) as a record, passed to `emit`."""
    wanted = set(profile.kernels)
    nf4_wanted = bool(wanted & {"nf4_dequant", "nf4_small_t_gemm", "nf4_dequant_gemm"})
    elem = torch.empty(0, dtype=dtype).element_size()
    for case in profile.cases:
        n, b, r = case.n, case.b, min(case.b, case.out_features)
        # As a training step calls the kernels: R in its fp32 storage and S as a scale folded
        # in the kernel (K1 on R's columns, the merge on R^T's rows, K3 with dR and dS).
        w = torch.randn(n, b, r, device=device) / b**0.5
        s = torch.rand(n, r, device=device) + 0.5
        # Weight-bound kernels read a different copy of their weights at every call (see
        # Profile.rotate_bytes): NF4 states for the NF4 kernels, dense cores for the merge.
        numel = case.out_features * n * r
        nf4_sets = _weight_sets(numel // 2, profile) if nf4_wanted else 0
        dense_sets = _weight_sets(numel * elem, profile) if "weight_merge" in wanted else 0
        cores = [torch.randn(case.out_features, n * r, device=device, dtype=dtype) / (n * r) ** 0.5
                 for _ in range(max(nf4_sets, dense_sets))]  # fmt: skip
        bnb_cores = [_bnb_nf4(core) for core in cores[:nf4_sets]]  # (packed, state) where bitsandbytes runs
        has_bnb = bool(bnb_cores) and bnb_cores[0] is not None
        states = [NF4Tensor.from_bnb(*bc) if bc else quantize_nf4(core.cpu(), double_quant=True).to(device)
                  for bc, core in zip(bnb_cores, cores, strict=False)]  # fmt: skip
        bnb_packed = [bc[0] for bc in bnb_cores] if has_bnb else None
        bnb_states = [bc[1] for bc in bnb_cores] if has_bnb else None
        if "weight_merge" in wanted:
            l_ts = [core.reshape(case.out_features, n, r) for core in cores[:dense_sets]]
            merge_fn = _rotating(block_diag_matmul, l_ts, w.transpose(1, 2), s, True)
            merge_t, how = _time_kernel(merge_fn, profile, device, dense_sets)
            f, by = floors.merge_cost(case.in_features, case.out_features, r, elem)
            emit(_record("kernel", "weight_merge", "fura", case, None, dtype, merge_t, **how,
                         **_rates(f, by, merge_t["median"], floors.roofline_ms(f, by, c))))  # fmt: skip
        if "nf4_dequant" in wanted:
            scratch = torch.empty(numel, device=device, dtype=dtype)
            f, by = floors.nf4_dequant_cost(numel, elem)
            dequant = {"qfura": _rotating(nf4_dequantize, states, dtype, scratch)}
            if has_bnb:
                dequant["bitsandbytes"] = _rotating(_bnb_functional().dequantize_4bit, bnb_packed, bnb_states)
            for method, fn in dequant.items():
                t, how = _time_kernel(fn, profile, device, nf4_sets)
                emit(_record("kernel", "nf4_dequant", method, case, None, dtype, t, **how,
                             **_rates(f, by, t["median"], floors.roofline_ms(f, by, c))))  # fmt: skip
        for tokens in profile.tokens:
            xs = [torch.randn(tokens, n, b, device=device, dtype=dtype) for _ in range(profile.input_sets)]
            gs = [torch.randn(tokens, n, r, device=device, dtype=dtype) for _ in range(profile.input_sets)]
            if "K1" in wanted:
                k1, how = _time_kernel(_rotating(block_diag_matmul, xs, w, s), profile, device)
                f, by = floors.k1_cost(tokens, case.in_features, n, r, elem)
                emit(_record("kernel", "K1", "fura", case, tokens, dtype, k1, **how,
                             **_rates(f, by, k1["median"], floors.roofline_ms(f, by, c))))  # fmt: skip
            if "K3" in wanted:
                k3, how = _time_kernel(
                    _rotating(block_diag_matmul_backward, gs, xs, w, s, True, True, True), profile, device
                )
                f, by = floors.k3_cost(tokens, case.in_features, n, r, elem)
                emit(_record("kernel", "K3", "fura", case, tokens, dtype, k3, **how,
                             **_rates(f, by, k3["median"], floors.roofline_ms(f, by, c))))  # fmt: skip
            gemm_name = "nf4_small_t_gemm" if tokens <= SMALL_T_MAX else "nf4_dequant_gemm"
            if gemm_name not in wanted:
                bar.update(1)
                continue
            zs = [torch.randn(tokens, n * r, device=device, dtype=dtype) for _ in range(profile.input_sets)]
            if tokens <= SMALL_T_MAX:
                # Decode path: ours dequantises inside the K loop; bitsandbytes' inference path
                # (`matmul_4bit`: its gemv kernel at T = 1, dequantise + matmul above).
                f, by = floors.nf4_gemm_cost(tokens, n * r, case.out_features, elem)
                timed = {"qfura": _rotating(nf4_matmul, zs, states)}
                if has_bnb:
                    timed["bitsandbytes"] = _rotating(_bnb_matmul_4bit, zs, bnb_packed, bnb_states)
            else:
                # Training path: the core is dequantised, then one cuBLAS GEMM (`nf4_matmul`'s
                # choice above SMALL_T_MAX tokens), as in QFuRALinearFunction's forward.
                f, by = floors.gemm_cost(tokens, n * r, case.out_features, elem)
                timed = {"qfura": _rotating(nf4_matmul, zs, states)}
                if has_bnb:
                    timed["bitsandbytes"] = _rotating(_bnb_dequant_then_gemm, zs, bnb_packed, bnb_states)
            with torch.no_grad():
                for method, fn in timed.items():
                    t, how = _time_kernel(fn, profile, device, nf4_sets)
                    emit(_record("kernel", gemm_name, method, case, tokens, dtype, t, **how,
                                 **_rates(f, by, t["median"], floors.roofline_ms(f, by, c))))  # fmt: skip
            bar.update(1)


# --- layer steps ----------------------------------------------------------------------------
def layer_suite(profile: Profile, device: torch.device, dtype: torch.dtype, c: Ceilings, bar, emit) -> None:
    elem = torch.empty(0, dtype=dtype).element_size()
    for case in profile.cases:
        r = min(case.b, case.out_features)
        profiled = any(part in case.name for part in profile.kernel_profile)
        for tokens in profile.tokens:
            inputs = [(torch.randn(tokens, case.in_features, device=device, dtype=dtype).requires_grad_(),
                       torch.randn(tokens, case.out_features, device=device, dtype=dtype))
                      for _ in range(profile.input_sets)]  # fmt: skip
            dense_floor = floors.dense_step_floor_ms(tokens, case.in_features, case.out_features, elem, c)
            fura_floors = {path: floors.fura_step_floor_ms(tokens, case.in_features, case.out_features, case.n, r,
                                                           elem, c, path)
                           for path in (floors.ACTIVATION_SIDE, floors.WEIGHT_SIDE)}  # fmt: skip
            for configuration in profile.configurations:
                for method in profile.methods:
                    bar.set_postfix_str(f"{case.name} T={tokens} {configuration} {method}")
                    if method in FURA_METHODS:
                        path = floors.fura_floor_path(method, tokens, case.out_features, case.n)
                        floor = fura_floors[path]
                    else:
                        path, floor = "dense", dense_floor
                    emit(_layer_record(method, case, tokens, dtype, device, configuration, inputs, profile,
                                       (floor, path, dense_floor), profiled))  # fmt: skip
                    bar.update(1)


def _layer_record(method, case, tokens, dtype, device, configuration, inputs, profile, floor, profiled) -> dict:
    """One method's layer step: forward + backward (`time_ms`, the layer's share of a model's
    step, which runs one optimizer step for all its layers) and the step with its own AdamW and
    zero_grad beside it (`step_time_ms`), eager and graphed; on a GPU, torch.profiler's account
    of the same steps. A method that fails is recorded as failed, with its error, and the run goes on."""
    floor_ms, floor_path, dense_floor = floor
    how = {"configuration": configuration}
    try:
        module = build(method, case, dtype, device, configuration)
        forward_backward = make_step(module, inputs, configuration, optimizer_step=False)
        t = measure(forward_backward, device, profile.warmup, profile.reps)
        params = trainable(module)
        full_step = make_step(module, inputs, configuration) if params else forward_backward
        step_t = measure(full_step, device, profile.warmup, profile.reps) if params else t
        # The module's own state (parameters, and buffers: QFuRA's NF4 core, the PEFT form's V0 and
        # S0) is referenced, not allocated, by what autograd keeps.
        state = [*module.parameters(), *module.buffers()]
        counted = {}
        if profile.counts:
            counted = {"saved_bytes": saved_for_backward_bytes(partial(module, inputs[0][0]), exclude=state),
                       "launches_per_step": _launches(module, inputs, configuration),
                       "flops_per_step": _flops(forward_backward)}  # fmt: skip
        record = _record("layer", "step", method, case, tokens, dtype, t, **how, timing="eager",
                         step_time_ms=step_t, trainable_params=sum(p.numel() for p in params),
                         peak_mem_bytes=peak_memory(full_step, device), **counted,
                         host_ms=_host_ms(forward_backward, device, profile),
                         floor_ms=floor_ms, floor_path=floor_path, pct_of_floor=100.0 * floor_ms / t["median"],
                         dense_floor_ms=dense_floor)  # fmt: skip
        if profiled and device.type == "cuda":
            record["kernel_profile"] = kernel_profile(forward_backward, device, 0, len(inputs))
        if profile.graphed and device.type == "cuda":
            record.update(_graphed(method, case, dtype, device, configuration, inputs, profile, profiled))
        return record
    except Exception as err:  # noqa: BLE001 - a failing method is a result, not the end of the run
        return _record("layer", "step", method, case, tokens, dtype, None, **how, skipped=f"{type(err).__name__}: "
                       f"{err}"[:300])  # fmt: skip
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _graphed(method, case, dtype, device, configuration, inputs, profile, profiled) -> dict:
    """The layer's forward + backward, and its step with AdamW (capturable, as graph capture
    needs), each captured once per input set in one CUDA graph and replayed: the device time
    without launch overhead, and where profiled, the kernels a replay runs, to set beside the
    eager step's (a replay slower than eager shows there whether its kernels or its gaps cost)."""
    fields = {}
    for key, optimizer_step in (("graphed_time_ms", False), ("graphed_step_time_ms", True)):
        module = build(method, case, dtype, device, configuration)
        step = make_step(module, inputs, configuration, capturable=optimizer_step, optimizer_step=optimizer_step)
        replay = graph_replay(step, device, 3, len(inputs))
        if replay is None:
            fields[key] = None
            fields["graphed_error"] = "the step could not be captured as a CUDA graph"
            continue
        fields[key] = measure_replay(replay, device, max(profile.reps, 10), len(inputs))
        if profiled and not optimizer_step:
            fields["graphed_kernel_profile"] = kernel_profile(replay, device, 0, 1, steps_per_call=len(inputs))
        del replay, step, module
    return fields


def _flops(step) -> int:
    """FLOPs of one step as torch's FLOP counter sees them (custom ops by their formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(0)
    return counter.get_total_flops()


def _launches(module, inputs, configuration) -> int:
    """Device launches of one step (on the Triton path each kernel a custom op launches; see bench.launches)."""
    from .launches import LaunchCounter

    step = make_step(module, inputs, configuration)
    step(0)
    counter = LaunchCounter()
    with counter:
        step(1)
    return len(counter.ops)


def _host_ms(step, device, profile) -> float | None:
    """Host time per step on a GPU: the median time to issue one step while the device is kept
    busy (steps back to back, no synchronisation between them). None on a CPU, where issuing a
    step is running it: host figures there come from the launch-only host suite
    (`python -m bench host`), which runs the Triton path a GPU runs."""
    import statistics

    if device.type != "cuda":
        return None
    for i in range(profile.warmup):
        step(i)
    times = []
    for i in range(profile.reps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    _sync(device)
    return 1e3 * statistics.median(times)


def _add_ratios(records: list[dict]) -> None:
    """Each layer record gets its time over LoRA r=32's and over the frozen dense layer's (None
    while the other method has not been measured: a partial file)."""

    def key_of(r):
        return r["name"], r["shape"]["name"], r["tokens"], r.get("configuration")

    by_key = {(*key_of(r), r["method"]): r for r in records if r["suite"] == "layer" and r.get("time_ms")}
    for rec in records:
        if rec["suite"] != "layer" or not rec.get("time_ms"):
            continue
        key = key_of(rec)
        for other, field_name in (("lora_r32", "ratio_vs_lora_r32"), ("dense_floor", "ratio_vs_dense")):
            ref = by_key.get((*key, other))
            rec[field_name] = rec["time_ms"]["median"] / ref["time_ms"]["median"] if ref else None


# --- whole model ----------------------------------------------------------------------------
def _sft_step(model, optimizer, batches, amp: torch.dtype | None, graph_steps: bool = False):
    """One SFT step in the fair configuration: bf16 autocast (for half-precision runs), then
    AdamW. `graph_steps`: a compiled model under CUDA graphs is told where each step begins."""

    def step(i: int) -> None:
        if graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        ids = batches[i % len(batches)]
        with torch.autocast(ids.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def model_suite(profile: Profile, device: torch.device, dtype: torch.dtype, bar, emit) -> None:
    for spec in profile.models:
        _model_runs(spec, profile, device, dtype, bar, emit)


def _model_variants(profile: Profile) -> list[tuple[bool, bool, bool]]:
    """(checkpointing, compiled, liger) triples of a profile's whole-model runs."""
    return [(ckpt, timing == "compiled", liger) for timing in profile.model_timings for liger in profile.liger
            for ckpt in profile.checkpointing]  # fmt: skip


def _model_methods(profile: Profile) -> list[str]:
    """The profile's methods that the whole-model suite runs, in the profile's order."""
    return [m for m in profile.methods if m in MODEL_METHODS]


@contextmanager
def liger_applied(model):
    """Liger-Kernel on `model` as HF Trainer's `use_liger_kernel=True` applies it
    (`transformers.integrations.liger.apply_liger_kernel`: RMSNorm, SwiGLU, RoPE and the fused
    linear cross-entropy on the model under any PEFT wrapper). Liger also rebinds names in
    transformers' Llama module (its RoPE function, RMSNorm and MLP classes), which would reach
    every model built afterwards: they are put back when the block ends."""
    from transformers.integrations.liger import apply_liger_kernel
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    try:
        apply_liger_kernel(model, None)
        yield model
    finally:
        for name, value in before.items():
            if vars(modeling_llama).get(name) is not value:
                setattr(modeling_llama, name, value)


def random_core_model(config, targets: list[str], device: torch.device, dtype: torch.dtype):
    """A Llama model converted to FuRA with random cores: built and converted on the meta
    device (nothing decomposed), then given storage and random values (std 1/sqrt(fan-in)).
    Its step costs what an SVD-initialised model's costs; its conversion costs nothing."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
        convert_to_fura(model, targets, progress=False)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                tensor.zero_()
            elif name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, tensor.shape[-1] ** -0.5 if tensor.dim() else 1.0)
    # The rotary tables are computed at construction, which the meta device skipped.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def _build_model(method, config, targets, device, dtype, amp, profile):
    """(model, conversion seconds, how its cores were made) for one whole-model run."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if method == "fura" and profile.random_cores:
        return random_core_model(config, targets, device, dtype), None, "random"
    with torch.device(device):
        # fair configuration: bf16 base weights; full fine-tuning keeps fp32 master weights
        model = LlamaForCausalLM(config).to(torch.float32 if method == "full_ft" and amp else dtype)
    start = time.perf_counter()
    if method in ADAPTED_METHODS:
        model = adapt_model(model, method, targets)
    _sync(device)
    return model, time.perf_counter() - start, "svd" if method in FURA_METHODS else None


def _model_runs(spec: dict, profile: Profile, device: torch.device, dtype: torch.dtype, bar, emit) -> None:
    from transformers import LlamaConfig

    spec = dict(spec)
    model_name, batch, seq = spec.pop("name"), spec.pop("batch"), spec.pop("seq")
    config = LlamaConfig(**spec, max_position_embeddings=max(seq, 128))
    amp = autocast_dtype("fair", dtype)
    shape = {"name": model_name, "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
             "batch": batch, "seq": seq}  # fmt: skip
    for method in _model_methods(profile):
        for checkpointing, compiled, liger in _model_variants(profile):
            bar.set_postfix_str(f"model {method} ckpt={checkpointing} compiled={compiled} liger={liger}")
            how = {"gradient_checkpointing": checkpointing, "timing": "compiled" if compiled else "eager",
                   "liger": liger, "compile_mode": profile.compile_mode if compiled else None}  # fmt: skip
            model = step = None
            try:
                model, convert_s, cores = _build_model(method, config, MODEL_TARGETS, device, dtype, amp, profile)
                with liger_applied(model) if liger else nullcontext():
                    if checkpointing:
                        enable_activation_checkpointing(model)
                        model.enable_input_require_grads()
                    model.train()
                    params = [p for p in model.parameters() if p.requires_grad]
                    batches = [torch.randint(0, config.vocab_size, (batch, seq), device=device) for _ in range(2)]
                    runner = (torch.compile(model, backend=profile.compile_backend, mode=profile.compile_mode)
                              if compiled else model)  # fmt: skip
                    graph_steps = compiled and profile.compile_mode in ("reduce-overhead", "max-autotune")
                    step = _sft_step(runner, torch.optim.AdamW(params, lr=1e-5, fused=True), batches, amp, graph_steps)
                    t = measure_until_steady(step, device, max(2, profile.warmup), profile.model_min_reps,
                                             profile.model_max_reps)  # fmt: skip
                    emit(_record("model", "sft_step", method, None, batch * seq, dtype, t, model=shape, **how,
                                 configuration="fair", tokens_per_s=batch * seq / (t["median"] * 1e-3),
                                 convert_s=convert_s, cores=cores, trainable_params=sum(p.numel() for p in params),
                                 peak_mem_bytes=peak_memory(step, device),
                                 # the device's own account of one step: how busy the host kept it
                                 kernel_profile=kernel_profile(step, device, 0, 1)))  # fmt: skip
            except Exception as err:  # noqa: BLE001 - out of memory, a missing library...: recorded, run goes on
                why = f"{type(err).__name__}: {err}"
                if liger and device.type != "cuda":
                    why = f"Liger-Kernel's kernels are Triton kernels, which need a GPU ({why})"
                emit(_record("model", "sft_step", method, None, batch * seq, dtype, None, model=shape, **how,
                             skipped=why[:300]))  # fmt: skip
            finally:
                model = step = None  # free before the next method is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            bar.update(1)
    if profile.random_cores and "fura" in _model_methods(profile):
        emit(_conversion_record(config, shape, device, dtype, amp, profile))
        bar.update(1)


def _conversion_record(config, shape, device, dtype, amp, profile) -> dict:
    """The one real conversion of a random-core run: `convert_to_fura`'s block SVDs of every
    projection, timed once (its time is the record's, in ms)."""
    try:
        model, convert_s, _ = _build_model("fura", config, MODEL_TARGETS, device, dtype, amp,
                                           replace(profile, random_cores=False))  # fmt: skip
        del model
        t = {"median": 1e3 * convert_s, "p20": 1e3 * convert_s, "p80": 1e3 * convert_s, "reps": 1}
        return _record("model", "convert", "fura", None, None, dtype, t, model=shape, convert_s=convert_s)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        return _record("model", "convert", "fura", None, None, dtype, None, model=shape,
                       skipped=f"{type(err).__name__}: {err}"[:300])  # fmt: skip
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def count_units(profile: Profile, suites: list[str]) -> int:
    per_case = len(profile.tokens)
    units = 0
    if "kernels" in suites:
        units += len(profile.cases) * per_case
    if "layers" in suites:
        units += len(profile.cases) * per_case * len(profile.methods) * len(profile.configurations)
    if "model" in suites:
        methods = _model_methods(profile)
        units += len(methods) * len(_model_variants(profile)) * len(profile.models)
        units += len(profile.models) if profile.random_cores and "fura" in methods else 0
    if "serve" in suites:
        units += serve_units(profile.serve)
    return units


def run_suites(profile: Profile, suites: list[str], device: torch.device, dtype: torch.dtype, stream) -> None:
    """Measure the ceilings, then every selected suite, handing each record to `stream` (a
    `results.ResultsStream`) as soon as it is measured, so a run stopped early keeps them."""
    c, ceiling_info = ceilings(device, dtype, quick=profile.name != "full")
    stream.set_ceilings(ceiling_info)

    def emit(record: dict) -> None:
        if record["suite"] == "layer":  # its ratios, and the earlier records' against it
            _add_ratios([*stream.records, record])
        stream.add(record)

    with tqdm(total=count_units(profile, suites), desc=f"fura-bench [{profile.name}]", unit="case") as bar:
        if "kernels" in suites:
            kernel_suite(profile, device, dtype, c, bar, emit)
        if "layers" in suites:
            layer_suite(profile, device, dtype, c, bar, emit)
        if "model" in suites:
            model_suite(profile, device, dtype, bar, emit)
        if "serve" in suites:
            serve_suite(profile, device, dtype, bar, emit, _record)
    # Measured again at the end: a machine whose speed changed during the run (other work on it,
    # clocks) shows here, and the summary warns that its ratios cannot be trusted.
    if not profile.counts:
        return
    _, again = ceilings(device, dtype, quick=profile.name != "full")
    stream.set_ceilings({**ceiling_info, "repeat": {key: again[key] for key in ("matmul_tflops", "copy_gbps")}})
