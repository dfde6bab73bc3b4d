"""The README's mixed-serving example end to end: three FuRA adapters trained by the SFT recipe
(`--peft-form`) on the shipped task examples, served from one base in one mixed batch."""

from __future__ import annotations

import pytest

from fura_kernels.recipes import serve_mixed, sft
from fura_kernels.recipes.eval_commonsense import shipped_eval_dir
from fura_kernels.recipes.tiny_model import make_tiny_llama

TASKS = ("boolq", "piqa", "winogrande")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Llama and one adapter a task, as the README trains them (fewer steps)."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_tiny_llama(root / "tiny-llama")
    adapters = {}
    for task in TASKS:
        metrics = sft.main(["--model", str(model_dir), "--output-dir", str(root / task), "--method", "fura",
                            "--peft-form", "--data", str(shipped_eval_dir() / task / "test.json"), "--max-steps", "8",
                            "--lr", "1e-2", "--batch-size", "3", "--cpu", "--no-progress"])  # fmt: skip
        adapters[task] = metrics["outputs"]["adapter"]
    return model_dir, adapters


def test_three_adapters_answer_one_mixed_batch_as_each_alone(trained, capsys):
    model_dir, adapters = trained
    argv = ["--model", str(model_dir), "--cpu", "--max-new-tokens", "6"]
    for task, directory in adapters.items():
        argv += ["--adapter", f"{task}={directory}"]
    result = serve_mixed.main(argv)
    who = [r["adapter"] for r in result["requests"]]
    assert who == [*TASKS, *TASKS, "__base__"]  # interleaved: every step of the batch mixes them
    out = capsys.readouterr().out
    assert "each answer equals its adapter's answer run alone (7 of 7)" in out
    for request in result["requests"]:
        assert f"[{request['adapter']}]" in out
    boolq = [r["prompt"] for r in result["requests"] if r["adapter"] == "boolq"]
    assert all("true or false" in prompt for prompt in boolq)  # each adapter got its own task's prompts


@pytest.mark.parametrize(
    "spec, message",
    [("boolq", "is not NAME=DIR"), ("__base__=x", "reserved"), ("boolq=/nonexistent", "no adapter_config.json")],
)
def test_bad_adapter_arguments_are_one_line_errors(tmp_path, spec, message):
    with pytest.raises(SystemExit, match=message):
        serve_mixed.main(["--model", str(tmp_path), "--adapter", spec])
