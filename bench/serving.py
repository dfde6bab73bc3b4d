"""The serving suite: many adapters on one base, in one mixed batch (`--only serve`).

A Llama-shaped model (random weights, the profile's `serve` shape) answers a batch whose
sequences are spread round-robin over K adapters, three ways:

- `base`: the model alone, no adapter (what any request pays);
- `fura_mixed`: K FuRA adapters (PEFT form, every projection), `adapter_names=[...]`: one
  segmented block-diagonal launch per layer, then the base GEMM for all tokens. They are served
  from their maps (`serve_from_maps`: `R`, `S`, `V0`, `S0` moved to the host; on a CPU run
  nothing moves, the host being the device);
- `lora_r32_mixed`: K PEFT LoRA r=32 adapters on the same projections, `adapter_names=[...]`:
  PEFT's mixed batch, one low-rank pair per adapter in the batch. Its adapters are kept in the
  model's dtype (`autocast_adapter_dtype=False`; PEFT's default fp32 copies would cost it more).

Two phases: `decode` (one token a sequence, after a prefill of `context` tokens in the KV cache,
which is cropped back after each step) and `prefill` (`prefill` tokens a sequence, logits for
the last one only, as `generate` asks). The steps run the way `generate` runs them: inside one
`adapter_names` context (PEFT's forward hooks entered once, the routing and the adapters' maps
prepared once), then forward after forward. Each record: median ms a step, tokens/s, peak
memory (CUDA), and the bytes the adapters hold on the device. FuRA's overhead over the base,
against LoRA r=32's, is the figure the report draws from them.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .timing import measure, peak_memory

SERVE_METHODS = ("base", "fura_mixed", "lora_r32_mixed")
SERVE_PHASES = ("decode", "prefill")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 32
# Spread between the cloned FuRA adapters (relative noise on S): they differ, as real ones do.
ADAPTER_SPREAD = 0.1


def serve_units(serve: dict | None) -> int:
    """Progress-bar units of the suite: one per (method, adapters, phase, batch)."""
    if not serve:
        return 0
    return len(SERVE_METHODS) * len(serve["adapters"]) * len(SERVE_PHASES) * len(serve["batches"])


def _base_model(serve: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {k: v for k, v in serve["model"].items() if k not in ("name", "batch", "seq")}
    config = LlamaConfig(**shape, max_position_embeddings=max(serve["context"] + 8, serve["prefill"], 128))
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def _fura_adapters(model, count: int):
    """`count` FuRA adapters: the first decomposes the base (an SVD per layer); the others are
    copies of it with their singular values spread, loaded as a saved adapter is (no SVD)."""
    from peft import get_peft_model

    from fura_kernels.peft import FuRALinear, FuRAPeftConfig, serve_from_maps

    model = get_peft_model(model, FuRAPeftConfig(target_modules=TARGETS, progress_bar=False), adapter_name="a0")
    generator = torch.Generator().manual_seed(1)
    for k in range(1, count):
        config = FuRAPeftConfig(target_modules=TARGETS, progress_bar=False)
        config._awaiting_saved_tensors = True  # filled below, as a state dict fills a loaded adapter
        model.add_adapter(f"a{k}", config)
        with torch.no_grad():
            for layer in model.modules():
                if not isinstance(layer, FuRALinear):
                    continue
                for attr in ("fura_R", "fura_V0", "fura_S0", "fura_bias"):
                    table = getattr(layer, attr)
                    if "a0" in table:
                        table[f"a{k}"].copy_(table["a0"])
                spread = 1 + ADAPTER_SPREAD * torch.randn(layer.fura_S["a0"].shape, generator=generator)
                layer.fura_S[f"a{k}"].copy_(layer.fura_S["a0"] * spread.to(layer.fura_S["a0"].device))
                layer.awaiting_saved_tensors.discard(f"a{k}")
    model.eval()
    serve_from_maps(model)  # as a server keeps them: the maps on the device, the rest on the host
    return model


def _lora_adapters(model, count: int):
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=TARGETS, init_lora_weights=False)

    model = get_peft_model(model, config(), adapter_name="a0", autocast_adapter_dtype=False)
    for k in range(1, count):
        model.add_adapter(f"a{k}", config())
    return model.eval()


def _adapter_bytes(model, device: torch.device) -> int:
    """Bytes the adapters hold on `device`: their tensors there, and FuRA's cached serving maps."""
    from fura_kernels.peft import FuRALinear

    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(part in name for part in (".fura_", ".lora_")) and tensor.device.type == device.type:
            total += tensor.numel() * tensor.element_size()
    for layer in model.modules():
        if isinstance(layer, FuRALinear) and layer.serving_maps is not None:
            total += sum(f.maps.numel() * f.maps.element_size() for f in layer.serving_maps.families)
            bias = layer.serving_maps.bias
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return total


def _phase_step(model, inner, names, phase: str, batch: int, serve: dict, device: torch.device):
    """`(context manager, step(i))` for one phase: the step runs `inner` (the transformers model)
    the way `generate` does, inside the `adapter_names` context that the manager enters."""
    vocab = inner.config.vocab_size
    generator = torch.Generator().manual_seed(2)
    hooks = model.base_model._enable_peft_forward_hooks(adapter_names=names) if names else nullcontext()
    if phase == "prefill":
        inputs = [torch.randint(0, vocab, (batch, serve["prefill"]), generator=generator).to(device) for _ in range(2)]

        def step(i: int) -> None:
            inner(input_ids=inputs[i % 2], use_cache=True, logits_to_keep=1)

        return hooks, step, None
    context = torch.randint(0, vocab, (batch, serve["context"]), generator=generator).to(device)
    tokens = [torch.randint(0, vocab, (batch, 1), generator=generator).to(device) for _ in range(2)]
    state = {}

    def prefill() -> None:
        state["cache"] = inner(input_ids=context, use_cache=True, logits_to_keep=1).past_key_values

    def step(i: int) -> None:
        cache = state["cache"]
        inner(input_ids=tokens[i % 2], past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to the prefilled context: every step decodes at the same length

    return hooks, step, prefill


def serve_suite(profile, device: torch.device, dtype: torch.dtype, bar, emit, record) -> None:
    """Every (adapters K, method, phase, batch) of the profile's `serve` settings, one record each.
    `record(...)` is the suites' record builder; failures are recorded and the run goes on."""
    serve = profile.serve
    if not serve:
        return
    for count in serve["adapters"]:
        for method in SERVE_METHODS:
            model = None
            try:
                model = _base_model(serve, device, dtype)
                if method == "fura_mixed":
                    model = _fura_adapters(model, count)
                elif method == "lora_r32_mixed":
                    model = _lora_adapters(model, count)
                inner = model.base_model.model if method != "base" else model
                _serve_runs(model, inner, method, count, serve, profile, device, dtype, bar, emit, record)
            except Exception as err:  # noqa: BLE001 - out of memory, a missing library...: recorded, run goes on
                why = f"{type(err).__name__}: {err}"[:300]
                for phase in SERVE_PHASES:
                    for batch in serve["batches"]:
                        emit(_serve_record(record, phase, method, batch, count, serve, dtype, None, skipped=why))
                        bar.update(1)
            finally:
                model = inner = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def _serve_record(record, phase, method, batch, count, serve, dtype, t, **extra) -> dict:
    per_sequence = 1 if phase == "decode" else serve["prefill"]
    shape = {"model": serve["model"]["name"], "layers": serve["model"]["num_hidden_layers"],
             "hidden_size": serve["model"]["hidden_size"], "batch": batch, "adapters": count,
             "tokens_per_sequence": per_sequence, "context": serve["context"] if phase == "decode" else 0,
             "adapter_dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    return record("serve", phase, method, None, batch * per_sequence, dtype, t, serve=shape, **extra)


def _serve_runs(model, inner, method, count, serve, profile, device, dtype, bar, emit, record) -> None:
    for phase in SERVE_PHASES:
        for batch in serve["batches"]:
            bar.set_postfix_str(f"serve {method} K={count} {phase} B={batch}")
            names = [f"a{i % count}" for i in range(batch)] if method != "base" else None
            hooks, step, prefill = _phase_step(model, inner, names, phase, batch, serve, device)
            with torch.no_grad(), hooks:
                if prefill is not None:
                    prefill()
                t = measure(step, device, profile.warmup, profile.reps)
                peak = peak_memory(step, device) if device.type == "cuda" else None
            tokens = batch * (1 if phase == "decode" else serve["prefill"])
            adapter_bytes = _adapter_bytes(model, device) if method != "base" else 0
            emit(_serve_record(record, phase, method, batch, count, serve, dtype, t,
                               tokens_per_s=tokens / (t["median"] * 1e-3), peak_mem_bytes=peak,
                               adapter_bytes=adapter_bytes))  # fmt: skip
            bar.update(1)
