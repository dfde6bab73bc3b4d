"""What a benchmark ran on: device, driver, CUDA and library versions (recorded with every run)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess

import torch

LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "fura-kernels")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# Where git cannot be asked (a copied tree without .git, as on a lent GPU machine), the commit
# comes from this variable; bench/device_check.sh sets it from the commit file written beforehand.
COMMIT_VARIABLE = "FURA_GIT_COMMIT"


def _git_commit() -> str | None:
    if os.environ.get(COMMIT_VARIABLE):
        return os.environ[COMMIT_VARIABLE]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(text: str) -> str:
    """A folder name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def describe(device: torch.device) -> dict:
    """The environment block of a results file."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = "cuda"
    else:
        name = f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads)"
        kind = "cpu"
    return {
        "device_kind": kind,
        "device_name": name,
        "device_slug": slug(name),
        "driver": _driver() if kind == "cuda" else None,
        "cuda": torch.version.cuda if kind == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {lib: _version(lib) for lib in LIBRARIES},
        "git_commit": _git_commit(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
