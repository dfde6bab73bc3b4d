"""How the benchmarks measure, each rule checked where it can fail: the layer's primary figure is
forward + backward (the optimizer step beside it), FuRA's floor follows the path its code takes,
the profiler's account is summed as the device saw it, host time is never a CPU step time, the
whole model repeats until its spread is under 5% (or says it is not), Liger and compiled PEFT
LoRA sit beside plain PEFT LoRA, and a run whose machine changed speed draws no verdict.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import cli, floors, methods, report, results, suites, timing
from bench.floors import Ceilings
from bench.methods import LayerCase
from fura_kernels.autograd import use_weight_side_merge

CPU = torch.device("cpu")
# A k_proj-like shape at CPU size: in > out, several input blocks, so T > out takes the merge.
NARROW = LayerCase("narrow.k_proj", 256, 128, 8, 32)


def _ops(step) -> list[str]:
    """The aten ops one call of `step` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        step(1)
    return rec.names


def _inputs(case: LayerCase, tokens: int, sets: int = 2):
    return [(torch.randn(tokens, case.in_features).requires_grad_(), torch.randn(tokens, case.out_features))
            for _ in range(sets)]  # fmt: skip


# --- 1. forward + backward first, the optimizer step beside it ---------------------------------
@pytest.mark.parametrize("method", ["fura", "lora_r32", "fura_peft"])
def test_the_primary_step_runs_no_optimizer_and_accumulates_no_gradient(method):
    module = methods.build(method, NARROW, torch.float32, CPU)
    inputs = _inputs(NARROW, 32)
    forward_backward = methods.make_step(module, inputs, "fair", optimizer_step=False)
    forward_backward(0)
    ops = _ops(forward_backward)
    assert not any("adam" in op for op in ops), [op for op in ops if "adam" in op]
    # The gradients are those of one backward, not a sum over the calls made so far.
    grads = [p.grad.clone() for p in methods.trainable(module)]
    forward_backward(1)
    for p, g in zip(methods.trainable(module), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    full = methods.make_step(module, inputs, "fair")
    assert any("_fused_adamw" in op for op in _ops(full)), "the step beside it runs fused AdamW"


def test_a_layer_record_times_forward_backward_first_and_the_step_beside_it(monkeypatch):
    """Which step each measurement gets: `time_ms` the one without the optimizer."""
    built, measured = {}, []
    real_make_step, real_measure = suites.make_step, suites.measure

    def make_step(*args, optimizer_step=True, **kwargs):
        step = real_make_step(*args, optimizer_step=optimizer_step, **kwargs)
        built[id(step)] = optimizer_step
        return step

    def measure(step, *args, **kwargs):
        measured.append(built.get(id(step)))
        return real_measure(step, *args, **kwargs)

    monkeypatch.setattr(suites, "make_step", make_step)
    monkeypatch.setattr(suites, "measure", measure)
    records = _layer_records(("fura",), 32)
    assert measured[:2] == [False, True]
    (rec,) = records
    assert rec["time_ms"]["median"] > 0 and rec["step_time_ms"]["median"] > 0
    results.validate(_file(records))


def _layer_records(method_names, tokens, case=NARROW) -> list[dict]:
    profile = suites.Profile("test", [case], [tokens], methods=method_names, warmup=1, reps=2, input_sets=2,
                             configurations=("fair",), graphed=False, rotate_bytes=0)  # fmt: skip
    c = Ceilings(matmul_flops=1e11, copy_bytes=1e10)
    records = []

    class Bar:
        def set_postfix_str(self, _):
            pass

        def update(self, _):
            pass

    suites.layer_suite(profile, CPU, torch.float32, c, Bar(), records.append)
    return records


def _file(records: list[dict]) -> dict:
    from bench import environment

    return {"schema_version": 1, "profile": "test", "suites": ["layers"], "environment": environment.describe(CPU),
            "ceilings": {"matmul_tflops": 0.1, "copy_gbps": 10.0, "dtype": "float32"}, "records": records}  # fmt: skip


# --- 2. the floor follows the code's path ------------------------------------------------------
def test_fura_floor_takes_the_weight_side_merge_where_the_code_does():
    c = Ceilings(matmul_flops=1e11, copy_bytes=1e10)
    case, r = NARROW, NARROW.b
    for tokens in (16, 128, 129, 512):
        merges = use_weight_side_merge(tokens, 1, case.n, case.out_features, need_g_l=False)
        assert merges == (tokens > case.out_features)
        want = floors.WEIGHT_SIDE if merges else floors.ACTIVATION_SIDE
        assert floors.fura_floor_path("fura", tokens, case.out_features, case.n) == want
        assert floors.fura_floor_path("qfura", tokens, case.out_features, case.n) == want
        # The PEFT form transforms the activations at every T; the reference has no merge.
        assert floors.fura_floor_path("fura_peft", tokens, case.out_features, case.n) == floors.ACTIVATION_SIDE
        assert floors.fura_floor_path("reference", tokens, case.out_features, case.n) == floors.ACTIVATION_SIDE
    args = (512, case.in_features, case.out_features, case.n, r, 4, c)
    merge = floors.fura_step_floor_ms(*args, path=floors.WEIGHT_SIDE)
    k1 = floors.fura_step_floor_ms(*args, path=floors.ACTIVATION_SIDE)
    # At T = 512 > out the merge moves 2*in*out elements where K1 moves 2*T*in: a lower floor.
    assert merge < k1
    with pytest.raises(ValueError, match="path"):
        floors.fura_step_floor_ms(*args, path="sideways")


def test_layer_records_name_the_path_of_their_floor():
    records = {r["method"]: r for r in _layer_records(("fura", "fura_peft", "dense_floor"), 256)}
    assert records["fura"]["floor_path"] == floors.WEIGHT_SIDE
    assert records["fura_peft"]["floor_path"] == floors.ACTIVATION_SIDE
    assert records["dense_floor"]["floor_path"] == "dense"
    c = Ceilings(matmul_flops=1e11, copy_bytes=1e10)
    want = floors.fura_step_floor_ms(256, 256, 128, 8, 32, 4, c, floors.WEIGHT_SIDE)
    assert records["fura"]["floor_ms"] == pytest.approx(want)
    # A record from before floors named their path is read on the code's path, not K1's.
    old = {k: v for k, v in records["fura"].items() if k != "floor_path"}
    floor, path = report.layer_floor(old, {"matmul_tflops": 0.1, "copy_gbps": 10.0})
    assert path == floors.WEIGHT_SIDE and floor == pytest.approx(want)


# --- 3. the profiler's account -----------------------------------------------------------------
def test_busy_time_is_the_union_of_the_device_activities():
    assert timing.busy_ms([]) == 0.0
    assert timing.busy_ms([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == pytest.approx(4.0)
    assert timing.busy_ms([(0.0, 10.0), (2.0, 3.0)]) == pytest.approx(10.0)  # nested
    kernels = [("gemm", 0.0, 2.0), ("k3", 2.5, 3.0), ("gemm", 4.0, 6.0), ("copy", 5.0, 5.5)]
    s = timing.kernel_summary(kernels, wall_ms=8.0, calls=2)
    assert s["kernel_ms"] == pytest.approx(5.0 / 2) and s["busy_ms"] == pytest.approx(4.5 / 2)
    assert s["device_busy"] == pytest.approx(4.5 / 8.0) and s["launches"] == 2
    assert list(s["top_kernels"]) == ["gemm", "k3", "copy"] and s["top_kernels"]["gemm"] == pytest.approx(2.0)


def test_the_profiler_cross_check_is_gpu_only_and_never_fakes_a_cpu_figure():
    assert timing.kernel_profile(lambda i: None, CPU, 0, 1) is None
    (rec,) = _layer_records(("fura",), 32)
    assert "kernel_profile" not in rec and "graphed_time_ms" not in rec


# --- 4. host time ------------------------------------------------------------------------------
def test_a_cpu_layer_record_has_no_host_time():
    """On a CPU, issuing a step is running it: what `_host_ms` measured there was the PyTorch
    path's step time, no host figure. Host figures come from the launch-only host suite."""
    (rec,) = _layer_records(("fura",), 32)
    assert rec["host_ms"] is None


# --- 5. the whole model's spread ---------------------------------------------------------------
def test_the_stopping_rule_waits_for_a_spread_under_five_percent_or_the_cap():
    steady = [100.0, 101.0, 100.5, 99.5, 100.2]
    noisy = [100.0, 130.0, 90.0, 160.0, 100.0]
    assert timing.spread(steady) < 0.05 < timing.spread(noisy)
    assert not timing.enough_reps(steady[:2], min_reps=5, max_reps=20)  # too few, however steady
    assert timing.enough_reps(steady, min_reps=5, max_reps=20)
    assert not timing.enough_reps(noisy, min_reps=5, max_reps=20)
    assert timing.enough_reps(noisy * 4, min_reps=5, max_reps=20)  # the cap


@pytest.mark.parametrize("noisy_rounds, met", [(1, True), (100, False)])
def test_measure_until_steady_repeats_until_the_rule_says_stop(monkeypatch, noisy_rounds, met):
    rounds = []

    def timed_calls(step, device, first, reps):
        rounds.append(reps)
        if len(rounds) <= noisy_rounds:
            return [100.0 + 40.0 * (i % 2) for i in range(reps)]
        return [100.0] * reps

    monkeypatch.setattr(timing, "_timed_calls", timed_calls)
    t = timing.measure_until_steady(lambda i: None, CPU, warmup=0, min_reps=8, max_reps=40)
    assert t["reps"] == sum(rounds) and rounds[0] == 8 and all(r == 2 for r in rounds[1:])
    assert t["spread_target_met"] is met and (t["spread"] < 0.05) is met
    assert t["reps"] == 40 if not met else t["reps"] < 40


# --- 6. what a user who wants speed picks: compiled PEFT LoRA, Liger ----------------------------
@pytest.mark.slow
def test_the_model_suite_runs_lora_compiled_and_both_methods_with_liger(tmp_path):
    path = cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--only", "model", "--models", "tiny-llama:1x16",
                    "--methods", "fura,lora_r32", "--checkpointing", "off", "--compile", "on", "--compile-backend",
                    "aot_eager", "--liger", "both", "--no-plots",
                    "--results-file", str(tmp_path / "m.json")])  # fmt: skip
    data = results.load(path)
    runs = {(r["method"], r["timing"], r["liger"]): r for r in data["records"] if r["suite"] == "model"}
    assert set(runs) == {(m, t, lg) for m in ("fura", "lora_r32") for t in ("eager", "compiled") for lg in (0, 1)}
    for method in ("fura", "lora_r32"):
        for t in ("eager", "compiled"):
            plain = runs[(method, t, False)]["time_ms"]
            assert plain["median"] > 0 and plain["reps"] >= 3 and "spread_target_met" in plain, (method, t)
            # Liger's kernels are Triton kernels: on a CPU the run is recorded, skipped, with why.
            liger = runs[(method, t, True)]
            assert liger["time_ms"] is None and "need a GPU" in liger["skipped"], liger
    table = report.table([(data, "m.json")])
    assert "| Liger |" in table and "| compiled | yes |" in table and "PEFT" in table


def test_liger_is_applied_as_hf_trainer_applies_it_and_put_back_afterwards():
    from liger_kernel.transformers.model.llama import lce_forward
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    config = LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)  # fmt: skip
    for wrap in ("lora", "fura"):
        model = LlamaForCausalLM(config)
        if wrap == "lora":
            model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        else:
            model = suites.random_core_model(config, suites.MODEL_TARGETS, CPU, torch.float32)
        base = model.get_base_model() if wrap == "lora" else model
        with suites.liger_applied(model):
            layer = base.model.layers[0]
            assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward, wrap
            assert layer.mlp._get_name() == "LigerSwiGLUMLP", wrap
            assert base.forward.__func__ is lce_forward, wrap
            assert modeling_llama.apply_rotary_pos_emb is not before["apply_rotary_pos_emb"]
        changed = [name for name, value in before.items() if vars(modeling_llama).get(name) is not value]
        assert not changed, f"Liger's rebinding of {changed} outlived the run ({wrap})"
        assert LlamaForCausalLM(config).model.norm.forward.__func__ is modeling_llama.LlamaRMSNorm.forward


def test_random_cores_train_like_a_converted_model_and_cost_no_svd(monkeypatch):
    from transformers import LlamaConfig

    import fura_kernels.layer as layer_module

    def no_svd(*args, **kwargs):
        raise AssertionError("random cores must not decompose anything")

    monkeypatch.setattr(layer_module, "block_svd", no_svd)
    config = LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)  # fmt: skip
    model = suites.random_core_model(config, suites.MODEL_TARGETS, CPU, torch.float32)
    ids = torch.randint(0, 256, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "FusedBTTLinear"


# --- 7. no verdict from a machine that changed speed; negative overheads are noise -------------
def _run_with(records: list[dict], drift: float) -> dict:
    data = _file(records)
    c = data["ceilings"]
    c["repeat"] = {"matmul_tflops": c["matmul_tflops"] * (1 - drift), "copy_gbps": c["copy_gbps"]}
    return data


def test_a_run_whose_ceilings_moved_draws_no_verdict():
    records = _layer_records(("fura", "lora_r32"), 32)
    suites._add_ratios(records)
    steady = report.summary(_run_with(records, 0.02))
    assert "FuRA's layer forward + backward took" in steady and "PEFT LoRA r=32" in steady
    moved = report.summary(_run_with(records, 0.4))
    closing = moved.split("Summary, on this device:", 1)[1]
    assert "not comparable" in closing and "40%" in closing
    assert "FuRA's layer" not in closing and "x PEFT LoRA" not in closing


def _serve(method: str, ms: float) -> dict:
    return {"suite": "serve", "name": "decode", "method": method, "dtype": "float32", "tokens": 16,
            "time_ms": {"median": ms, "p20": ms, "p80": ms, "reps": 3},
            "serve": {"model": "tiny", "layers": 2, "hidden_size": 64, "batch": 16, "adapters": 4,
                      "tokens_per_sequence": 1, "context": 8},
            "adapter_bytes": 0 if method == "base" else 10}  # fmt: skip


def test_a_negative_serving_overhead_is_reported_as_noise():
    records = [_serve("base", 10.0), _serve("fura_mixed", 9.8), _serve("lora_r32_mixed", 12.0)]
    table = "\n".join(report.serve_table(records))
    assert "noise (-2.0%)" in table and "+20.0%" in table
    row = next(line for line in table.splitlines() if line.startswith("| decode"))
    assert row.split("|")[10].strip() == "n/a"  # no share drawn from noise
    closing = report.summary(_run_with(records, 0.0)).split("Summary, on this device:", 1)[1]
    assert "negative overhead, which is noise, left out" in closing and "at most -" not in closing


def test_results_written_by_the_new_harness_validate():
    records = _layer_records(("fura", "lora_r32"), 256)
    suites._add_ratios(records)
    data = _file(records)
    results.validate(json.loads(json.dumps(data)))
    bad = json.loads(json.dumps(data))
    bad["records"][0]["floor_path"] = "sideways"
    with pytest.raises(Exception, match="sideways"):
        results.validate(bad)


def test_the_summary_tells_other_kernels_from_slower_ones_in_a_graph_replay():
    """What the profiler's account is for: a replay slower than eager either runs other kernels
    (cuBLAS picked other algorithms under capture) or the same ones slower (clocks)."""
    (base,) = _layer_records(("fura",), 32)

    def profiled(eager_kernels, graphed_kernels):
        rec = json.loads(json.dumps(base))
        rec["kernel_profile"] = timing.kernel_summary(eager_kernels, wall_ms=4.0, calls=1)
        rec["graphed_kernel_profile"] = timing.kernel_summary(graphed_kernels, wall_ms=4.0, calls=1)
        return rec

    other = profiled([("gemm_128x256", 0.0, 2.0), ("k3", 2.0, 3.0)], [("gemm_64x128", 0.0, 2.6), ("k3", 2.6, 3.6)])
    same = profiled([("gemm_128x256", 0.0, 2.0), ("k3", 2.0, 3.0)], [("gemm_128x256", 0.0, 2.6), ("k3", 2.6, 3.6)])
    equal = profiled([("gemm_128x256", 0.0, 2.0)], [("gemm_128x256", 0.0, 2.02)])
    text = report.summary(_run_with([other, same, equal], 0.0))
    assert "torch.profiler's account of the layer steps" in text and "75%" in text  # busy 3 of 4 ms
    lines = [line for line in text.splitlines() if "graph replay kernels" in line]
    assert len(lines) == 2, lines  # the 1% difference is not reported
    assert "1.20x eager's: other kernels (eager only: gemm_128x256; graphed only: gemm_64x128)" in lines[0]
    assert "1.20x eager's: the same kernels" in lines[1]
