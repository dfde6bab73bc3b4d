"""The commonsense evaluation: answer extraction for every task pattern, and the command end to
end on the shipped examples with a tiny model (plain, with a FuRA adapter, and after SFT)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from fura_kernels import convert_to_fura, save_fura_adapter
from fura_kernels.recipes import eval_commonsense as ec
from fura_kernels.recipes import sft
from fura_kernels.recipes.tiny_model import make_tiny_llama


@pytest.mark.parametrize(
    "task, output, expected",
    [
        ("boolq", "The correct answer is TRUE, not false.", "true"),  # case-insensitive, first match wins
        ("boolq", "false. well, true", "false"),
        ("boolq", "maybe", ""),  # no match: scored wrong
        ("piqa", "Solution2 is better than solution1", "solution2"),
        ("piqa", "solution3", ""),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("ARC-Challenge", "Answer5 fits; answer1 does not", "answer5"),
        ("ARC-Easy", "answer 2", ""),  # the pattern has no space
        ("openbookqa", "answer4answer1", "answer4"),
        ("hellaswag", "ENDING4", "ending4"),
        ("hellaswag", "ending5", ""),
        ("winogrande", "option2 then option1", "option2"),
        ("winogrande", "the first option", ""),
    ],
)
def test_answer_extraction(task, output, expected):
    assert ec.extract_answer(task, output) == expected


def test_every_task_ships_examples_and_a_pattern():
    tasks = ec.load_tasks(ec.shipped_eval_dir())
    assert set(tasks) == set(ec.TASKS) == set(ec.ANSWER_PATTERNS)
    for task, records in tasks.items():
        assert len(records) >= 3 and all(ec.extract_answer(task, r["answer"]) == r["answer"] for r in records), task


def test_a_subset_of_tasks_runs_and_an_empty_folder_says_so(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "test.json").write_text(json.dumps([{"instruction": "x", "answer": "solution1"}]))
    assert set(ec.load_tasks(tmp_path)) == {"piqa"}
    with pytest.raises(ValueError, match="no <task>/test.json"):
        ec.load_tasks(tmp_path / "piqa")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64)


FAST = ["--num-beams", "2", "--max-new-tokens", "8", "--no-progress"]


def test_command_prints_a_table_and_writes_json(tiny_model_dir, tmp_path, capsys):
    results = ec.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "r.json"), *FAST])
    assert set(results) == set(ec.TASKS) | {"mean"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["total"] >= 3 for t, r in results.items() if t != "mean")
    assert results["mean"] == pytest.approx(sum(results[t]["accuracy"] for t in ec.TASKS) / len(ec.TASKS))
    printed = capsys.readouterr().out
    assert "| boolq |" in printed and "| mean |" in printed
    assert json.loads((tmp_path / "r.json").read_text())["mean"] == results["mean"]


def test_command_with_a_fura_adapter(tiny_model_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    convert_to_fura(model, ["q_proj", "v_proj"], progress=False)
    save_fura_adapter(model, tmp_path / "adapter")
    results = ec.main(["--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), *FAST])
    assert set(results) == set(ec.TASKS) | {"mean"}
    assert f"loaded the FuRA adapter {tmp_path / 'adapter'} (4 FuRA layers)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a FuRA nor a PEFT adapter"):
        ec.main(["--model", str(tiny_model_dir), "--adapter", str(tmp_path), *FAST])


def test_sft_evaluates_at_the_end(tiny_model_dir, tmp_path):
    metrics = sft.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--method", "fura",
                        "--max-steps", "2", "--batch-size", "4", "--no-progress", "--eval-commonsense",
                        str(ec.shipped_eval_dir()), "--eval-num-beams", "2", "--eval-max-new-tokens", "8"])  # fmt: skip
    assert set(metrics["commonsense"]) == set(ec.TASKS) | {"mean"}
    assert json.loads((tmp_path / "metrics.json").read_text())["commonsense"]["mean"] == metrics["commonsense"]["mean"]
