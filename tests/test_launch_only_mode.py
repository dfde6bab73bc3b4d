"""`FURA_LAUNCH_ONLY=1`: the mode `python -m bench host` measures the host path in.

The variable is read when fura_kernels is imported, so the mode's own tests
(`tests/launch_only/`, and the custom ops' fake checks once more with the production launchers)
run in a process started with it. Here: that process passes, the mode refuses what it cannot
serve, and nothing changes without the variable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fura_kernels.triton import launch_only, ops, plans

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="launch-only mode stands in for a GPU; on a GPU it refuses to start"
)


def _environment(**variables: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", launch_only.ENV_VARIABLE)}
    env.update(variables)
    return env


def test_the_mode_passes_its_tests_in_a_process_of_its_own():
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/launch_only",
               "tests/kernels/test_op_fakes.py"]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, env=_environment(FURA_LAUNCH_ONLY="1"), capture_output=True, text=True)
    summary = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, summary
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) > 100, summary  # the launch-only tests were collected and ran
    assert "skipped" not in run.stdout.splitlines()[-1], summary


def test_the_mode_refuses_the_interpreter_too():
    run = subprocess.run([sys.executable, "-c", "import fura_kernels"], cwd=ROOT, capture_output=True, text=True,
                         env=_environment(FURA_LAUNCH_ONLY="1", TRITON_INTERPRET="1"))  # fmt: skip
    assert run.returncode != 0
    assert "FURA_LAUNCH_ONLY=1 and TRITON_INTERPRET=1 are both set" in run.stderr, run.stderr[-2000:]


def test_nothing_changes_without_the_variable():
    assert os.environ.get(launch_only.ENV_VARIABLE) != "1"
    assert not launch_only.ENABLED and launch_only.launch_count() == 0 and launch_only.launches() == []
    expected = "cpu" if plans.INTERPRET else "cuda"
    assert plans.TRITON_DEVICE_TYPE == ops.TRITON_DEVICE_TYPE == expected
    # The CPU path stays PyTorch's: a layer step keeps no launch plan.
    from fura_kernels import FusedBTTLinear

    layer = FusedBTTLinear.from_linear(torch.nn.Linear(64, 48))
    layer(torch.randn(5, 64, requires_grad=True)).sum().backward()
    assert plans.kept_plans() == []
