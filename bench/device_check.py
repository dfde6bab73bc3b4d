"""The device check: one call on a bare GPU machine that checks and times the product in at
most LIMIT_S seconds and leaves at most 7 files, flat, under $OUT (`bash bench/device_check.sh`).

Steps run in the order below, the most proof a second first: what only a GPU can measure (the
kernels, the layer steps with the profiler's account, the whole model, the compiled model), then
the GPU tests that need no compiler, the QFuRA/QLoRA model and serving, and the Inductor tests,
the slowest proof, last. Every benchmark step runs in one Python process (`runner`: a process
start costs 10-15 s on the device machine), which takes one step at a time; the tests run in
processes of their own, under pytest-timeout. Each step gets `min(its budget, time left)`; one
that cannot start with its `min_start_s` left is skipped and logged. A step is asked to stop
KILL_GRACE_S before its time is up (a benchmark step by SIGUSR1 to the runner, which writes its
partial results and takes the next step; a test step by SIGTERM) and SIGKILLed, with its whole
process group, when it is up, so no step can push the check past LIMIT_S. If the first step cannot
import what the rest need, the check stops there.

What a CPU checks is not run here: the FLOP, launch and saved-bytes passes and the second ceiling
measurement (`--timing-only`); the CPU tests count those, and the device does not change them.

| step | budget | estimate | what |
|---|---|---|---|
| env | 40 s | 25 s | install the carried wheels, import what the rest needs, record the environment |
| kernels | 35 s | 35 s | NF4 decode vs bitsandbytes at T = 1, 4, 16; K1, K3, merge at T = 8192 |
| layers | 65 s | 60 s | fair layer steps, eager and graphed, 7 methods x 5 Llama-3-8B shapes, T = 8192; profiler at k |
| model | 80 s | 75 s | Llama-3-8B, 1 x 2048 tokens, eager, random cores: FuRA, LoRA r=32, each +- Liger; one SVD |
| compile | 70 s | 70 s | Llama-3-8B widths, 4 layers, torch.compile reduce-overhead: FuRA and LoRA r=32 |
| tests | 80 s | 70 s | `pytest tests/gpu -m "not inductor"`, 60 s a test at most, JUnit XML report |
| qmodel | 40 s | 45 s | Llama-3-8B eager: QFuRA and QLoRA r=32 |
| serve | 30 s | 35 s | mixed-adapter batches (decode, prefill), 16/64 sequences, 1/4/16 adapters: FuRA, LoRA, base |
| inductor | 40 s | 60 s | `pytest tests/gpu -m inductor` (reduce-overhead training, alternating lengths) |

The env step imports torch, triton, transformers, peft, bitsandbytes, jsonschema,
pytest_timeout and fura_kernels, and records device, driver, versions and commit. The layer
step's methods: frozen dense floor, FuRA, LoRA r=32, QFuRA, QLoRA r=32, and FuRA's PEFT form
(`fura_kernels.peft`) on the bf16 base and on QLoRA's NF4 base. The whole-model steps run
without activation checkpointing and report tokens/s, their spread, peak memory and the
profiler's device-busy fraction. Random cores: the step of a converted model does not depend on
its values, and the 30 s of block SVDs said nothing about it; the one conversion is its own record.

How the budgets were set: the first GPU run (H200, 2026-11-27) measured env 20 s on a warm machine
and over 25 s on a cold one, layers 50 s for 7 methods eager and graphed (each now also times the
step with AdamW and, at k_proj, a profiled pass: +10 s, less the counting passes it no longer runs),
kernels 34 s, and a whole-model step of 0.21-0.24 s with a 30 s conversion (now one, after the
runs); the GPU tier took 120 s for 75 tests, about half of it Inductor compiling (now its own last
step); the compile step's 4 layers compile in about a quarter of the 16-layer model's time. The
QFuRA/QLoRA, serving and Inductor steps run only if time is left and may come back partial: their
records are written one by one, so what they finished comes back.

Files under $OUT: `summary.json` (environment, commit, every step's budget, time, exit status
and outcome, written again after each step), `device_check.log` (every step's output),
`tests.xml` and `tests-inductor.xml` (the GPU tiers' JUnit reports), `layers.json`,
`kernels.json` and `model.json` (results files; the model, compile, qmodel and serving steps
append to one file). Plots are made afterwards, on any machine: `python -m bench.report OUT/layers.json ...`.

`DRY_RUN=1` runs the same steps with tiny shapes on the CPU (`--profile cpu-tiny`), for CI. Its
budgets are the GPU's times DRY_RUN_SCALE: they are for the GPU, and a loaded CPU must not fail a
dry run by its clock. Overrides, for tests and reruns: `DEVICE_CHECK_STEPS=layers,kernels` (run
only these), `DEVICE_CHECK_LIMIT=SECONDS`, `DEVICE_CHECK_BUDGET_<STEP>=SECONDS` (not scaled),
`DEVICE_CHECK_ARGS_<STEP>="..."` (more arguments for that step's command).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

LIMIT_S = 480
# SIGTERM this long before a step's time is up: the benchmark writes its partial file and exits.
KILL_GRACE_S = 10
# Per-test limit of the GPU tier (pytest-timeout): one hung test must not take the whole step.
TEST_TIMEOUT_S = 60
# A dry run's budgets and limit are the GPU's times this: budgets are for the GPU, and a loaded
# CPU must not fail a dry run by its clock (the scheduler's stops are tested with explicit budgets).
DRY_RUN_SCALE = 10
# The runner's channel back to the scheduler: one JSON line per step, on this inherited descriptor.
RUNNER_FD_ENV = "FURA_DEVICE_RUNNER_FD"
# What the rest of the check imports: the first step stops everything if one of these fails.
REQUIRED_MODULES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "jsonschema", "pytest_timeout",
                    "fura_kernels")  # fmt: skip
# pytest writes its JUnit report when the session ends, also after an interrupt: SIGTERM (the
# step's time limit) is turned into one, so a tier stopped early still reports what it ran.
PYTEST_STOPPABLE = ("import signal, sys, pytest; signal.signal(signal.SIGTERM, signal.default_int_handler); "
                    "sys.exit(pytest.main(sys.argv[1:]))")  # fmt: skip
WHEELS = ".whl"  # carried with the call: the wheels the machine lacks, and the commit file
COMMIT_FILE = Path(WHEELS) / "COMMIT"
SITE = "/tmp/fura-device-site"  # where the carried wheels are installed


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # the most wall time it may take, its kill grace included
    min_start_s: int  # skipped when less than this is left
    estimate_s: int  # expected on an H100 / H200 (see the module docstring for how)
    command: tuple[str, ...]
    output: str | None = None  # the file under OUT it writes
    # Seconds between the stop signal and SIGKILL (None: KILL_GRACE_S); a step with nothing to flush needs none.
    grace_s: float | None = None
    # A benchmark run in the shared runner process (`command` is then `python -m bench`'s argv).
    in_runner: bool = False


@dataclass
class Outcome:
    name: str
    budget_s: int
    estimate_s: int
    status: str  # ok, failed, killed (by its time limit), skipped, stopped (after a failed env step)
    given_s: float | None = None
    elapsed_s: float | None = None
    returncode: int | None = None
    output: str | None = None
    note: str | None = None
    extra: dict = field(default_factory=dict)


def _bench(*args: str) -> tuple[str, ...]:
    """A benchmark step's arguments (run by the runner: `python -m bench` without the process)."""
    return ("--no-plots", "--timing-only", *args)


def _pytest(out: Path, report: str, marks: str) -> tuple[str, ...]:
    return (sys.executable, "-c", PYTEST_STOPPABLE, "tests/gpu", "-q", "-p", "no:cacheprovider", "-m", marks,
            f"--timeout={TEST_TIMEOUT_S}", f"--junitxml={out / report}")  # fmt: skip


def steps(out: Path, dry_run: bool) -> list[Step]:
    """The check's steps for a GPU (or, with `dry_run`, the same steps at tiny CPU sizes)."""
    where = ("--profile", "cpu-tiny", "--device", "cpu") if dry_run else ("--profile", "full")
    layer_tokens, kernel_tokens = ("64", "1,4,16,64") if dry_run else ("8192", "1,4,16,8192")
    big, compiled = ("tiny-llama", "tiny-llama") if dry_run else ("llama3-8b:1x2048", "llama3-8b-4-layers:1x2048")
    # On the CPU, Inductor's C++ build of even a tiny model outlasts the step: the dry run checks
    # the plumbing of a compiled run with the backend that traces the same graphs and compiles
    # nothing (and so takes no mode: CUDA graphs are Inductor's).
    backend = ("--compile-backend", "aot_eager") if dry_run else ("--compile-mode", "reduce-overhead")
    model = ("--only", "model", "--checkpointing", "off", "--results-file", str(out / "model.json"), "--append")
    return [
        Step("env", 40, 10, 25, (sys.executable, "-m", "bench.device_check", "--probe"), grace_s=1),
        Step("kernels", 35, 20, 35,
             _bench(*where, "--only", "kernels", "--cases", "llama3-8b", "--tokens", kernel_tokens,
                    "--kernels", "nf4_small_t_gemm,K1,K3,weight_merge", "--results-file", str(out / "kernels.json")),
             "kernels.json", in_runner=True),
        Step("layers", 65, 30, 60,
             _bench(*where, "--only", "layers", "--cases", "llama3-8b", "--tokens", layer_tokens,
                    "--methods", "dense_floor,fura,lora_r32,qfura,qlora_r32,fura_peft,fura_peft_nf4",
                    "--configurations", "fair", "--kernel-profile", "k_proj",
                    "--results-file", str(out / "layers.json")), "layers.json", in_runner=True),
        Step("model", 80, 45, 75,
             _bench(*where, *model, "--models", big, "--methods", "fura,lora_r32", "--compile", "off",
                    "--cores", "random", "--liger", "both"), "model.json", in_runner=True),
        Step("compile", 70, 40, 70,
             _bench(*where, *model, "--models", compiled, "--methods", "fura,lora_r32", "--compile", "only",
                    "--cores", "random", "--liger", "off", *backend), "model.json", in_runner=True),
        Step("tests", 80, 30, 70, _pytest(out, "tests.xml", "not inductor"), "tests.xml"),
        Step("qmodel", 40, 30, 45,
             _bench(*where, *model, "--models", big, "--methods", "qfura,qlora_r32", "--compile", "off", "--liger",
                    "off"), "model.json", in_runner=True),
        Step("serve", 30, 20, 35,
             _bench(*where, "--only", "serve", "--results-file", str(out / "model.json"), "--append"), "model.json",
             in_runner=True),
        Step("inductor", 40, 30, 60, _pytest(out, "tests-inductor.xml", "inductor"), "tests-inductor.xml"),
    ]  # fmt: skip


def _commit() -> str | None:
    """The commit measured: git's, where the tree is a checkout; else the file written before
    the call (a copied tree has no .git); else None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)  # fmt: skip
        if head.returncode == 0:
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if COMMIT_FILE.is_file():
        return COMMIT_FILE.read_text().strip() or None
    return None


def _install_wheels(log) -> None:
    """Install the carried wheels (no network on the machine); they are put first on sys.path."""
    wheels = sorted(Path(WHEELS).glob("*.whl"))
    if not wheels:
        print("env: no carried wheels (.whl/*.whl); using what is installed", file=log, flush=True)
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", SITE, *map(str, wheels)]  # fmt: skip
    print(f"env: installing {len(wheels)} wheels: {' '.join(w.name for w in wheels)}", file=log, flush=True)
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=120)


def probe() -> int:
    """The first step's imports, in its own process: print the environment as JSON, or say which
    import failed and exit 1."""
    import importlib

    failed = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - every failure is reported, whatever it is
            failed.append(f"{name}: {type(err).__name__}: {err}")
    if failed:
        print("env: these imports failed, so the later steps cannot run:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    import torch

    from . import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment.describe(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory,
                   capability=list(torch.cuda.get_device_capability(device)))  # fmt: skip
    env["versions"].update({m: getattr(sys.modules[m], "__version__", None) for m in ("bitsandbytes", "jsonschema")})
    print(json.dumps(env))
    return 0


def _run(step: Step, given: float, log) -> tuple[int, float, bool, str]:
    """Run a step with SIGTERM at `given` less its grace (KILL_GRACE_S unless it says otherwise)
    and SIGKILL (its process group) at `given`. Returns (exit status, seconds, whether it was
    stopped by its limit, its stdout)."""
    grace = KILL_GRACE_S if step.grace_s is None else step.grace_s
    start = time.monotonic()
    stdout = subprocess.PIPE if step.name == "env" else log
    proc = subprocess.Popen(step.command, stdout=stdout, stderr=log, start_new_session=True, text=True)
    killed = False
    try:
        captured, _ = proc.communicate(timeout=max(given - grace, 1))
    except subprocess.TimeoutExpired:
        killed = True
        proc.send_signal(signal.SIGTERM)
        try:
            captured, _ = proc.communicate(timeout=max(given - (time.monotonic() - start), 0.1))
        except subprocess.TimeoutExpired:
            captured = None
    finally:
        _kill_group(proc)
    return proc.returncode, time.monotonic() - start, killed, captured or ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:  # whatever it left behind (compile workers, say) goes with it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Runner:
    """The one process that runs every benchmark step (`python -m bench.device_check --runner`):
    it reads a step's `python -m bench` arguments as a JSON line on its stdin, runs them in
    process, and answers `{"rc": ...}` on an inherited pipe. SIGUSR1 stops the step it is running
    (the benchmark writes its partial file, as it does on SIGTERM) and leaves it ready for the
    next; a runner that does not answer in time is killed with its process group, and the next
    benchmark step starts another."""

    def __init__(self, log) -> None:
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.replies = None

    def _start(self) -> None:
        read_end, write_end = os.pipe()
        env = {**os.environ, RUNNER_FD_ENV: str(write_end)}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.device_check", "--runner"], stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=self.log, pass_fds=(write_end,), env=env,
                                     start_new_session=True, text=True)  # fmt: skip
        os.close(write_end)
        self.replies = os.fdopen(read_end, "r")

    def _reply(self, deadline: float) -> dict | None:
        """The runner's answer, or None if none came by `deadline` (a `time.monotonic()`) or it died."""
        import select

        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.replies], [], [], left)
            if ready:
                line = self.replies.readline()
                return json.loads(line) if line else None
        return None

    def run(self, step: Step, given: float) -> tuple[int, float, bool, str]:
        grace = KILL_GRACE_S if step.grace_s is None else step.grace_s
        start = time.monotonic()
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"argv": list(step.command)}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self.close()
            return -1, time.monotonic() - start, False, ""
        reply = self._reply(start + max(given - grace, 1))
        if reply is not None:
            return reply["rc"], time.monotonic() - start, False, ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            reply = self._reply(start + given)
        if reply is not None:
            return reply["rc"], time.monotonic() - start, True, ""
        rc = self.proc.poll()
        died = rc is not None  # it died by itself; else it is killed now, at its time
        self.close()
        return (rc if died else -signal.SIGKILL), time.monotonic() - start, not died, ""

    def close(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None
        if self.replies is not None:
            self.replies.close()
            self.replies = None


def serve_as_runner() -> int:
    """The runner's side of `Runner`: each line on stdin is one benchmark step, run here."""
    import gc
    import traceback

    from . import cli

    replies = os.fdopen(int(os.environ[RUNNER_FD_ENV]), "w")
    running = False

    def stop(signum, frame):
        if running:  # a stop that comes after the step answered must not hit the next one
            raise cli.Terminated(f"signal {signum}")

    signal.signal(signal.SIGUSR1, stop)
    for line in sys.stdin:
        argv = json.loads(line)["argv"]
        print(f"runner {os.getpid()}: python -m bench {shlex.join(argv)}", flush=True)
        running = True
        try:
            cli.main(argv)
            rc = 0
        except SystemExit as done:
            rc = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except cli.Terminated:  # stopped before the benchmark took over its signals
            rc = 143
        except Exception:  # noqa: BLE001 - the step failed; the runner takes the next one
            traceback.print_exc()
            rc = 1
        finally:
            running = False
        sys.stdout.flush()
        sys.stderr.flush()
        _release_device_memory()
        gc.collect()
        replies.write(json.dumps({"rc": rc}) + "\n")
        replies.flush()
    return 0


def _release_device_memory() -> None:
    """What one step leaves behind must not crowd the next: compiled graphs and cached blocks."""
    import torch

    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _budget(step: Step, dry_run: bool) -> int:
    override = os.environ.get(f"DEVICE_CHECK_BUDGET_{step.name.upper()}")
    if override:
        return int(override)
    return step.budget_s * (DRY_RUN_SCALE if dry_run else 1)


def run_check(out: Path, dry_run: bool, started: float, limit_s: int | None = None) -> dict:
    """Run every step within `limit_s` of `started` (a `time.time()`), writing OUT/summary.json
    after each one. Returns the summary."""
    limit_s = limit_s or int(os.environ.get("DEVICE_CHECK_LIMIT") or LIMIT_S * (DRY_RUN_SCALE if dry_run else 1))
    only = [s for s in os.environ.get("DEVICE_CHECK_STEPS", "").split(",") if s]
    out.mkdir(parents=True, exist_ok=True)
    summary = {"limit_s": limit_s, "kill_grace_s": KILL_GRACE_S, "dry_run": dry_run, "commit": _commit(),
               "environment": None, "steps": []}  # fmt: skip
    if summary["commit"]:
        os.environ["FURA_GIT_COMMIT"] = summary["commit"]  # the results files record it too

    def save() -> None:
        tmp = out / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, out / "summary.json")

    with open(out / "device_check.log", "a") as log:
        runner = Runner(log)
        try:
            _run_steps(out, dry_run, started, limit_s, only, summary, save, log, runner)
        finally:
            runner.close()
    summary["total_s"] = round(time.time() - started, 1)
    save()
    return summary


def _run_steps(out: Path, dry_run: bool, started: float, limit_s: int, only: list[str], summary: dict, save, log,
               runner: Runner) -> None:  # fmt: skip
    """`run_check`'s loop: each step in turn, its outcome saved in the summary as it ends."""
    stop_reason = None
    for step in steps(out, dry_run):
        if only and step.name not in only:
            continue
        budget = _budget(step, dry_run)
        extra = tuple(shlex.split(os.environ.get(f"DEVICE_CHECK_ARGS_{step.name.upper()}", "")))
        step = replace(step, budget_s=budget, command=step.command + extra)
        outcome = Outcome(step.name, budget, step.estimate_s, "skipped", output=step.output)
        left = limit_s - (time.time() - started)
        if stop_reason:
            outcome.status, outcome.note = "stopped", stop_reason
        elif left < step.min_start_s:
            outcome.note = f"{left:.0f} s left, it needs {step.min_start_s} s to start"
        else:
            given = min(budget, left)
            step_start = time.time()
            print(f"\n===== {step.name}: up to {given:.0f} s: {shlex.join(step.command)}", file=log, flush=True)
            print(f"[{step_start - started:5.0f} s] {step.name}: started, up to {given:.0f} s", flush=True)
            try:
                if step.name == "env" and not dry_run:
                    _install_wheels(log)
                run = runner.run if step.in_runner else partial(_run, log=log)
                rc, _, killed, captured = run(step, given - (time.time() - step_start))
            except (OSError, subprocess.SubprocessError) as err:
                rc, killed, captured = -1, False, ""
                print(f"{step.name}: could not run: {err}", file=log, flush=True)
            elapsed = time.time() - step_start
            outcome.given_s, outcome.elapsed_s, outcome.returncode = round(given, 1), round(elapsed, 1), rc
            outcome.status = "killed" if killed else ("ok" if rc == 0 else "failed")
            if step.name == "env":
                if rc == 0 and captured.strip():
                    summary["environment"] = json.loads(captured.strip().splitlines()[-1])
                else:
                    stop_reason = "the env step failed (an import, or the wheels): see device_check.log"
                    outcome.status = "failed"
            if step.output and (out / step.output).is_file() and step.output.endswith(".json"):
                outcome.extra = _results_summary(out / step.output)
        summary["steps"].append(asdict(outcome))
        save()
        print(f"[{time.time() - started:5.0f} s] {step.name}: {outcome.status}"
              + (f" in {outcome.elapsed_s} s (rc {outcome.returncode})" if outcome.elapsed_s is not None else "")
              + (f": {outcome.note}" if outcome.note else ""), flush=True)  # fmt: skip


def _results_summary(path: Path) -> dict:
    """Records, failures and partial flag of a results file, for the summary."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"unreadable": str(err)}
    records = data.get("records", [])
    return {"records": len(records), "failed_records": sum(1 for r in records if r.get("skipped")),
            "partial": data.get("partial", False)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--probe"]:
        return probe()
    if argv == ["--runner"]:
        return serve_as_runner()
    out = Path(os.environ.get("OUT") or "/tmp/fura-device-check")
    dry_run = os.environ.get("DRY_RUN", "") not in ("", "0")
    started = float(os.environ.get("DEVICE_CHECK_START") or time.time())
    if not dry_run and Path(WHEELS).is_dir():
        # The carried wheels go first on the path of every step (installed by the env step).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)
    summary = run_check(out, dry_run, started)
    print(f"\ndevice check, {'dry run (CPU)' if dry_run else 'GPU'}: commit {summary['commit'] or 'unknown'}, "
          f"{summary['total_s']} s of {summary['limit_s']} s")  # fmt: skip
    print(f"{'step':8s} {'status':8s} {'budget':>6s} {'time':>6s}  results")
    for s in summary["steps"]:
        extra = s["extra"]
        what = f"{extra.get('records')} records, {extra.get('failed_records')} failed" if "records" in extra else ""
        what += " (partial)" if extra.get("partial") else ""
        took = f"{s['elapsed_s']:.0f}" if s["elapsed_s"] is not None else "-"
        print(f"{s['name']:8s} {s['status']:8s} {s['budget_s']:6d} {took:>6s}  {what or s.get('note') or ''}")
    env_failed = any(s["name"] == "env" and s["status"] != "ok" for s in summary["steps"])
    return 1 if env_failed else 0


if __name__ == "__main__":
    sys.exit(main())
