"""What a new user meets first: install hints for missing extras, declared floors, the license."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_fura_bench_without_its_extra_prints_an_install_hint(monkeypatch):
    """It used to fail with a raw `No module named 'jsonschema'`."""
    import importlib.util

    from bench import cli

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "peft" else object())
    with pytest.raises(SystemExit, match=r"^fura-bench needs peft: pip install 'fura-kernels\[bench\]'$"):
        cli.main(["--quick"])


def test_sft_without_its_extra_prints_an_install_hint(monkeypatch):
    import importlib.util

    from fura_kernels.recipes import sft

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "accelerate" else object())
    with pytest.raises(SystemExit, match=r"sft needs accelerate: pip install 'fura-kernels\[sft\]'$"):
        sft.main(["--model", "unused", "--output-dir", "unused"])


def test_missing_bitsandbytes_names_the_quant_extra(monkeypatch):
    from fura_kernels.nf4 import require_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"QLoRA baseline needs bitsandbytes: pip install 'fura-kernels\[quant\]'"):
        require_bitsandbytes("QLoRA baseline")


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {name: [r.split(";")[0].strip() for r in reqs] for name, reqs in groups.items()}


def test_each_dependency_has_one_floor_across_extras():
    floors: dict[str, set[str]] = {}
    for reqs in _requirements().values():
        for req in reqs:
            name = req.split(">=")[0].split("[")[0].strip()
            floors.setdefault(name, set()).add(req)
    assert {n: f for n, f in floors.items() if len(f) > 1} == {}


def test_installed_versions_meet_the_declared_floors():
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    for reqs in _requirements().values():
        for req in reqs:
            name, _, floor = req.partition(">=")
            try:
                installed = version(name.split("[")[0].strip())
            except PackageNotFoundError:
                continue
            assert Version(installed.split("+")[0]) >= Version(floor), f"{name} {installed} < {floor}"


def test_license_file_is_the_declared_apache_2():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text


def test_wheel_installs_no_top_level_bench_and_no_test_tooling(tmp_path):
    """`bench/` installs as `fura_kernels.bench`; test tooling (the compile checker, the naive SVD,
    the pytest-benchmark file) stays out of users' site-packages."""
    import shutil
    import subprocess
    import zipfile

    # From a clean copy: a `build/` left in a checkout would leak old files into the wheel.
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "fura-bench-results", "results")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info" not in n} == {"fura_kernels"}
    assert "fura_kernels/bench/cli.py" in names and "fura_kernels/bench/results_schema.json" in names
    assert not [n for n in names if "compile_check" in n or "/tests/" in n or n.split("/")[-1].startswith("test_")]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fura-bench = fura_kernels.bench.cli:main" in entry_points
    assert "naive_block_svd" not in zipfile.ZipFile(wheel).read("fura_kernels/reference.py").decode()


def test_the_peft_method_without_peft_names_its_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "fura_kernels.peft" or m.startswith("fura_kernels.peft.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"needs peft: pip install 'fura-kernels\[peft\]'"):
        import fura_kernels.peft  # noqa: F401
