"""GPU tier for the benchmark harness's device-only figures: a layer record carries torch.profiler's
account of its eager forward + backward and of the same replayed as a CUDA graph, the step with
AdamW beside it, and a real host time; the whole model records its device-busy fraction."""

from __future__ import annotations

import pytest
import torch

from bench import floors, suites
from bench.floors import Ceilings
from bench.methods import LayerCase

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")
# k_proj's shape: T > out, so FuRA's code (and its floor) takes the weight-side merge.
K_PROJ = LayerCase("llama3-8b.k_proj", 4096, 1024, 64, 64)


class _Bar:
    def set_postfix_str(self, _):
        pass

    def update(self, _):
        pass


def test_layer_records_carry_the_profilers_account_eager_and_graphed():
    profile = suites.Profile("gpu-test", [K_PROJ], [2048], methods=("fura", "lora_r32"), warmup=2, reps=5,
                             input_sets=2, configurations=("fair",), counts=False)  # fmt: skip
    records = []
    suites.layer_suite(profile, DEVICE, torch.bfloat16, Ceilings(5e14, 3e12), _Bar(), records.append)
    by_method = {r["method"]: r for r in records}
    for method, rec in by_method.items():
        assert rec["time_ms"] and rec["step_time_ms"] and rec["host_ms"] > 0, (method, rec.get("skipped"))
        eager, graphed = rec["kernel_profile"], rec["graphed_kernel_profile"]
        assert eager["kernel_ms"] > 0 and 0 < eager["device_busy"] <= 1.05, (method, eager)
        assert eager["busy_ms"] <= eager["kernel_ms"] + 1e-6 and eager["launches"] >= 1
        # A replay runs the same kernels as the eager step; its summed time is comparable.
        assert graphed["kernel_ms"] > 0 and graphed["launches"] >= 1, (method, graphed)
        assert rec["graphed_time_ms"]["median"] > 0 and rec["graphed_step_time_ms"]["median"] > 0
    assert by_method["fura"]["floor_path"] == floors.WEIGHT_SIDE


def test_a_whole_model_record_carries_its_device_busy_fraction():
    tiny = dict(suites.TINY_MODEL, hidden_size=256, intermediate_size=512, seq=128)
    profile = suites.Profile("gpu-test", [], [], methods=("fura", "lora_r32"), models=[tiny],
                             checkpointing=(False,), model_timings=("eager",), model_min_reps=3, model_max_reps=6,
                             random_cores=True)  # fmt: skip
    records = []
    suites.model_suite(profile, DEVICE, torch.bfloat16, _Bar(), records.append)
    steps = [r for r in records if r["name"] == "sft_step"]
    assert {r["method"] for r in steps} == {"fura", "lora_r32"}
    for rec in steps:
        assert rec["time_ms"], rec.get("skipped")
        assert 0 < rec["kernel_profile"]["device_busy"] <= 1.05 and "spread_target_met" in rec["time_ms"]
    assert [r["convert_s"] > 0 for r in records if r["name"] == "convert"] == [True]
