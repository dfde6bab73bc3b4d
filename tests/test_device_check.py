"""The device check (`bench/device_check.sh`) as CI can run it: the dry run on the CPU leaves the
same files as a GPU run, every benchmark step runs in one process, a step stopped by its budget
still leaves a valid partial results file, and the scheduler skips, kills and stops as documented.
No test here asserts a wall-clock time: budgets are the GPU's, and a loaded CPU must still pass
(the dry run scales them; the stopping tests give explicit ones and check what was stopped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import device_check, results

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {"summary.json", "device_check.log", "tests.xml", "tests-inductor.xml", "layers.json", "kernels.json",
                  "model.json"}  # fmt: skip
# The device tool brings back at most 8 files, at most two folders below OUT.
MAX_FILES, MAX_DEPTH = 8, 2
# A hang guard for the dry run's process, not a budget: far above what a loaded CPU takes.
HANG_S = 3600


def _dry_run(out: Path, **env) -> tuple[subprocess.CompletedProcess, dict]:
    environ = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    environ.pop("DEVICE_CHECK_START", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=HANG_S)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary


def _files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def _assert_given_within_budgets(summary: dict) -> None:
    """The scheduler's arithmetic (no clock is read here): no step was given more than its budget."""
    for step in summary["steps"]:
        if step["given_s"] is not None:
            assert step["given_s"] <= step["budget_s"], step


def _runner_pids(out: Path) -> list[str]:
    """The process id of each benchmark step, as the runner logged it."""
    return re.findall(r"^runner (\d+): python -m bench", (out / "device_check.log").read_text(), flags=re.MULTILINE)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check")
    proc, summary = _dry_run(out)
    return out, proc, summary


@pytest.mark.slow
def test_dry_run_leaves_the_files_a_gpu_run_leaves(dry_run):
    out, proc, summary = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = _files(out)
    assert {p.name for p in files} == EXPECTED_FILES and len(files) <= MAX_FILES
    assert all(len(p.relative_to(out).parts) <= MAX_DEPTH + 1 for p in files)
    assert [s["name"] for s in summary["steps"]] == [s.name for s in device_check.steps(out, dry_run=True)]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    _assert_given_within_budgets(summary)
    # A dry run's budgets are the GPU's scaled up: a loaded CPU is not failed by its clock.
    gpu = {s.name: s.budget_s for s in device_check.steps(out, dry_run=False)}
    assert all(s["budget_s"] == gpu[s["name"]] * device_check.DRY_RUN_SCALE for s in summary["steps"])
    # Every benchmark step ran in the one runner process.
    benchmarks = [s.name for s in device_check.steps(out, dry_run=True) if s.in_runner]
    pids = _runner_pids(out)
    assert len(pids) == len(benchmarks) == 6 and len(set(pids)) == 1, pids
    assert summary["dry_run"] and summary["commit"] and summary["environment"]["git_commit"] == summary["commit"]
    # The last lines the device tool returns: a table with a row per step.
    assert "device check, dry run (CPU)" in proc.stdout and all(f"\n{s.name}" in proc.stdout for s in
                                                                 device_check.steps(out, True))  # fmt: skip


@pytest.mark.slow
def test_dry_run_results_hold_every_method_and_kernel(dry_run):
    out, _, _ = dry_run
    layers, kernels, model = (results.load(out / name) for name in ("layers.json", "kernels.json", "model.json"))
    for data in (layers, kernels, model):
        assert data["partial"] is False and data["environment"]["git_commit"]
    timed = {r["method"] for r in layers["records"] if r["suite"] == "layer" and r["time_ms"]}
    assert timed == {"dense_floor", "fura", "lora_r32", "qfura", "qlora_r32", "fura_peft", "fura_peft_nf4"}
    assert {r["configuration"] for r in layers["records"]} == {"fair"}
    assert {r["name"] for r in kernels["records"]} == {"K1", "K3", "weight_merge", "nf4_small_t_gemm"}
    assert {r["tokens"] for r in kernels["records"] if r["name"] == "nf4_small_t_gemm"} == {1, 4, 16, 64}
    serve = {(r["method"], r["name"], r["serve"]["adapters"]) for r in model["records"] if r["suite"] == "serve"}
    assert serve == {(m, phase, k) for m in ("base", "fura_mixed", "lora_r32_mixed") for phase in ("decode", "prefill")
                     for k in (1, 4)}  # fmt: skip
    assert all(r["time_ms"] for r in model["records"] if r["suite"] == "serve")
    steps = [r for r in model["records"] if r["suite"] == "model" and r["name"] == "sft_step"]
    runs = {(r["method"], r["timing"]) for r in steps if r["time_ms"]}
    assert runs == {("fura", "eager"), ("lora_r32", "eager"), ("qfura", "eager"), ("qlora_r32", "eager"),
                    ("fura", "compiled"), ("lora_r32", "compiled")}  # fmt: skip
    assert not any(r["gradient_checkpointing"] for r in steps)
    # Both methods with Liger too, in the eager model step: on a CPU recorded as skipped, with why.
    liger = {r["method"]: r for r in steps if r["liger"]}
    assert set(liger) == {"fura", "lora_r32"} and all("need a GPU" in r["skipped"] for r in liger.values())
    # FuRA's runs on random cores, and its one conversion timed on its own, once per model step.
    assert {r["cores"] for r in steps if r["method"] == "fura" and r["time_ms"]} == {"random"}
    conversions = [r for r in model["records"] if r["name"] == "convert"]
    assert len(conversions) == 2 and all(r["convert_s"] > 0 for r in conversions)
    assert all("spread_target_met" in r["time_ms"] for r in steps if r["time_ms"])
    # What a CPU already checks is not counted again on the device's clock.
    layer = [r for r in layers["records"] if r["time_ms"]]
    assert not any("flops_per_step" in r or "launches_per_step" in r for r in layer)
    assert "repeat" not in layers["ceilings"]
    for report_name in ("tests.xml", "tests-inductor.xml"):
        suite = ET.parse(out / report_name).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        assert int(suite.get("tests")) > 0 and int(suite.get("errors")) == 0 and int(suite.get("failures")) == 0


@pytest.mark.slow
def test_steps_stopped_by_their_budgets_still_bring_back_their_files(tmp_path):
    """A test tier with a test that outlasts its budget, and a layer step with far more work than
    its budget (800 records, minutes here), are each asked to stop 10 s before their time is up
    (SIGTERM to pytest, SIGUSR1 to the runner): pytest still writes its report, the benchmark
    writes what it measured, marked partial, and the runner answers for the step. The layer step
    gets 50 s before its stop: a CUDA build of torch takes 10-20 s to import, more on a loaded
    machine, and a stop that arrives before the benchmark has started leaves nothing to flush."""
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "test_slow.py").write_text(
        "import time\n\n\ndef test_outlasts_the_step():\n    time.sleep(60)\n"
    )
    tokens = ",".join(str(t) for t in range(1, 81))
    out = tmp_path / "out"
    overrides = {"DEVICE_CHECK_STEPS": "tests,layers", "DEVICE_CHECK_BUDGET_TESTS": "20",
                 "DEVICE_CHECK_ARGS_TESTS": str(tmp_path / "slow" / "test_slow.py"),
                 "DEVICE_CHECK_BUDGET_LAYERS": "60",
                 "DEVICE_CHECK_ARGS_LAYERS": f"--tokens {tokens} --configurations fair,pure"}  # fmt: skip
    proc, summary = _dry_run(out, **overrides)
    by_name = {s["name"]: s for s in summary["steps"]}
    tests, layers = by_name["tests"], by_name["layers"]
    assert tests["status"] == "killed" and layers["status"] == "killed", summary["steps"]
    assert layers["returncode"] == 143  # the benchmark flushed its file and the runner answered
    _assert_given_within_budgets(summary)
    report = ET.parse(out / "tests.xml").getroot()
    report = report if report.tag == "testsuite" else report.find("testsuite")
    assert int(report.get("tests")) > 0
    data = results.load(out / "layers.json")
    assert data["partial"] is True and "SIGTERM" in data["partial_reason"]
    assert 1 <= len(data["records"]) < 800 and all(r["time_ms"] for r in data["records"])
    assert "layers   killed" in proc.stdout and "tests    killed" in proc.stdout


def _fake_steps(out, dry_run):
    """Steps that take known times: the scheduler is checked without running anything heavy."""
    py = sys.executable
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    return [
        device_check.Step("env", 5, 1, 1, (py, "-c", 'print(\'{"device_name": "fake"}\')')),
        device_check.Step("quick", 5, 1, 1, (py, "-c", "pass")),
        device_check.Step("stubborn", 3, 1, 1, (py, "-c", ignore_term)),  # ignores SIGTERM: SIGKILL at 3 s
        device_check.Step("late", 60, 50, 1, (py, "-c", "pass")),  # cannot start: about 16 s are left
    ]


def test_scheduler_kills_an_overrunning_step_and_skips_one_that_cannot_start(monkeypatch, tmp_path):
    monkeypatch.setattr(device_check, "steps", _fake_steps)
    monkeypatch.setattr(device_check, "KILL_GRACE_S", 1)
    import time

    summary = device_check.run_check(tmp_path, dry_run=True, started=time.time(), limit_s=20)
    status = {s["name"]: s for s in summary["steps"]}
    assert summary["environment"] == {"device_name": "fake"}
    assert status["quick"]["status"] == "ok"
    # It ignored SIGTERM, so only the SIGKILL at its budget can have ended it.
    assert status["stubborn"]["status"] == "killed" and status["stubborn"]["returncode"] == -9
    assert status["late"]["status"] == "skipped" and "needs 50 s" in status["late"]["note"]
    _assert_given_within_budgets(summary)


def test_scheduler_stops_when_the_first_step_cannot_import(monkeypatch, tmp_path):
    def steps(out, dry_run):
        env = device_check.Step("env", 5, 1, 1, (sys.executable, "-c", "import no_such_module_here"))
        return [env, *_fake_steps(out, dry_run)[1:2]]

    monkeypatch.setattr(device_check, "steps", steps)
    import time

    summary = device_check.run_check(tmp_path, dry_run=True, started=time.time(), limit_s=20)
    assert [s["status"] for s in summary["steps"]] == ["failed", "stopped"]
    assert "No module named 'no_such_module_here'" in (tmp_path / "device_check.log").read_text()


def test_gpu_budgets_fit_the_limit_and_name_every_promised_measurement(tmp_path):
    gpu = device_check.steps(tmp_path, dry_run=False)
    assert sum(s.budget_s for s in gpu) <= device_check.LIMIT_S == 480
    names = [s.name for s in gpu]
    assert names == ["env", "kernels", "layers", "model", "compile", "tests", "qmodel", "serve", "inductor"]
    by_name = {s.name: s for s in gpu}
    assert all(s.min_start_s <= s.budget_s and s.budget_s > device_check.KILL_GRACE_S for s in gpu)
    assert {s.name for s in gpu if s.in_runner} == {"kernels", "layers", "model", "compile", "qmodel", "serve"}
    command = {name: " ".join(step.command) for name, step in by_name.items()}
    assert all("--timing-only" in command[s.name] for s in gpu if s.in_runner)  # counts are the CPU's to check
    assert "--tokens 1,4,16,8192" in command["kernels"]
    layers = command["layers"]
    assert "--tokens 8192" in layers and "dense_floor,fura,lora_r32,qfura,qlora_r32" in layers
    assert "--configurations fair" in layers and "--cases llama3-8b" in layers and "--kernel-profile k_proj" in layers
    model = command["model"]
    assert "llama3-8b:1x2048" in model and "--checkpointing off" in model and "--compile off" in model
    assert "--methods fura,lora_r32" in model and "--cores random" in model and "--liger both" in model
    compiled = command["compile"]
    assert "llama3-8b-4-layers:1x2048" in compiled and "--compile-mode reduce-overhead" in compiled
    assert "--compile only" in compiled and "--methods fura,lora_r32" in compiled
    assert "--only serve" in command["serve"] and "model.json" in command["serve"]
    assert "not inductor" in by_name["tests"].command and "inductor" in by_name["inductor"].command
    # The docstring's table is the documentation of record: it must match the steps.
    for step in gpu:
        assert f"| {step.name} | {step.budget_s} s | {step.estimate_s} s |" in device_check.__doc__, step.name


def test_the_inductor_tests_are_marked_so_they_run_last():
    """The GPU tier splits on the `inductor` mark: every test that compiles with Inductor has it."""
    gpu_tests = ROOT / "tests" / "gpu"
    for path in sorted(gpu_tests.glob("test_*.py")):
        source = path.read_text()
        for name, body in re.findall(r"\ndef (test_\w+)\(.*?\):\n(.*?)(?=\n(?:@|def |class )|\Z)", source, flags=re.S):
            if "torch.compile(" in body:
                head = source.split(f"def {name}(", 1)[0].rsplit("\n\n\n", 1)[-1]
                assert "@pytest.mark.inductor" in head, f"{path.name}::{name} compiles but is not marked inductor"
