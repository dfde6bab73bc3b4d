"""Recipes check their inputs before loading a model or training (issue 22): a bad path, data
file or record is a one-line error naming it, never a stack trace after the last step."""

from __future__ import annotations

import json

import pytest

from fura_kernels.recipes import eval_commonsense as ec
from fura_kernels.recipes import grpo, sft, vlm
from fura_kernels.recipes.tiny_llava import make_shapes_dataset
from fura_kernels.recipes.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64)


def _sft(model_dir, out, *extra):
    return sft.main(["--model", str(model_dir), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                     "--no-progress", *extra])  # fmt: skip


def _write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("main, name", [(sft.main, "sft"), (grpo.main, "grpo"), (vlm.main, "vlm")])
def test_an_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, main, name, monkeypatch):
    from transformers import AutoTokenizer

    def never(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the output folder was checked")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", never)
    blocker = _write(tmp_path / "out", "not a folder")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(SystemExit, match=f"^{name}: --output-dir .*out exists and is not a folder$"):
        main(["--model", str(model_dir), "--output-dir", str(blocker), "--no-progress"])


@pytest.mark.parametrize("main, name", [(sft.main, "sft"), (grpo.main, "grpo"), (vlm.main, "vlm")])
def test_a_missing_model_path_is_one_line(tmp_path, main, name):
    with pytest.raises(SystemExit, match=f"^{name}: --model .*nowhere is not a folder"):
        main(["--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"), "--no-progress"])


def test_a_max_length_shorter_than_every_prompt_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(
        SystemExit, match="none of the \\d+ training examples .* has a response token within --max-length"
    ):
        _sft(tiny_model_dir, tmp_path, "--max-length", "8")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "records, extra, message",
    [
        (
            [{"instruction": "a", "output": "b"}],
            (),
            "has 1 example\\(s\\); with --eval-fraction 0.1, 1 go to evaluation",
        ),
        ([{"instruction": "a", "output": "b"}] * 4, ("--eval-fraction", "1.0"), "--eval-fraction 1.0 must be between"),
        ([{"instruction": "a", "output": 3}], (), "record 0 of .*data.json: 'output' is int 3, expected a string"),
        ([{"instruction": "a"}], (), "record 0 of .*data.json needs 'instruction' and 'output'"),
    ],
    ids=["one-example", "all-eval", "non-string-output", "missing-output"],
)
def test_sft_data_problems_are_one_line(tiny_model_dir, tmp_path, records, extra, message):
    data = _write(tmp_path / "data.json", json.dumps(records))
    with pytest.raises(SystemExit, match=message):
        _sft(tiny_model_dir, tmp_path / "out", "--data", str(data), *extra)


@pytest.mark.parametrize(
    "content, message",
    [("", "is empty"), (b"\xff\xfe[]", "is not UTF-8 text"), ("[{", "is not valid JSON")],
    ids=["empty", "not-utf8", "not-json"],
)
def test_unreadable_data_files_are_one_line(tiny_model_dir, tmp_path, content, message):
    data = _write(tmp_path / "data.json", content)
    with pytest.raises(SystemExit, match=f"^sft: .*data.json {message}"):
        _sft(tiny_model_dir, tmp_path / "out", "--data", str(data))
    with pytest.raises(SystemExit, match=f"^grpo: .*data.json {message}" if content != "[{" else "^grpo: .*line 1"):
        grpo.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "g"), "--data", str(data)])


def test_an_empty_commonsense_task_file_is_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "boolq").mkdir()
    _write(tmp_path / "boolq" / "test.json", "[]")
    with pytest.raises(SystemExit, match="boolq/test.json must hold a non-empty JSON list"):
        ec.main(["--model", str(tiny_model_dir), "--data", str(tmp_path), "--no-progress"])


def test_a_vlm_image_missing_is_found_before_training(tmp_path):
    from fura_kernels.recipes.tiny_llava import make_tiny_llava

    model_dir = make_tiny_llava(tmp_path / "llava")
    data = make_shapes_dataset(tmp_path / "shapes", count=8)
    records = json.loads(data.read_text())
    (data.parent / records[5]["image"]).unlink()
    with pytest.raises(
        SystemExit, match=f"^vlm: record 5 of .*data.json: image .*{records[5]['image']} does not exist"
    ):
        vlm.main(["--model", str(model_dir), "--output-dir", str(tmp_path / "out"), "--data", str(data),
                  "--max-steps", "2", "--no-progress", "--cpu"])  # fmt: skip


def test_metrics_are_strict_json_even_with_a_nan(tmp_path):
    from fura_kernels.recipes.common import write_metrics

    write_metrics(tmp_path / "metrics.json", {"train_loss": [{"step": 1, "loss": float("nan")}], "x": float("inf")})
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"train_loss": [{"step": 1, "loss": None}], "x": None}
