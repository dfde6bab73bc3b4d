"""The MiniLM method comparison: its task, its pipeline (the smoke profile: CI checks the pipeline,
not the result), and the README table generated from the committed results file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from fura_kernels.recipes import minilm_compare, polarity_task

ROOT = Path(__file__).resolve().parents[1]


def test_the_task_is_fixed_balanced_and_holds_out_its_adjectives():
    sizes = {"train": 2048, "validation": 400, "test": 800}
    splits = polarity_task.make_splits(sizes)
    assert {k: len(v) for k, v in splits.items()} == sizes
    assert polarity_task.task_fingerprint(splits) == polarity_task.task_fingerprint(polarity_task.make_splits(sizes))
    for items in splits.values():
        assert sum(it["label"] for it in items) == len(items) // 2  # balanced
        assert len({it["text"] for it in items}) == len(items)  # no duplicates within a split
    adjectives = polarity_task.adjective_splits()
    words = {split: set(adjectives[split][0]) | set(adjectives[split][1]) for split in adjectives}
    assert not words["train"] & words["validation"] and not words["train"] & words["test"]
    assert not words["validation"] & words["test"]
    for split, items in splits.items():  # every sentence uses only its own split's adjectives
        others = set().union(*(w for s, w in words.items() if s != split))
        assert not any(word in others for it in items for word in it["text"].rstrip(".").replace(",", "").split())


def test_labels_follow_the_rule_written_in_the_docstring():
    """Re-derive each label from the text: the main clause's adjective, flipped by its negation
    and by "it is not true that"."""
    adjectives = polarity_task.adjective_splits()["train"]
    polarity = {a: p for p, words in adjectives.items() for a in words}
    negations = ("not ", "never ", "far from ", "hardly ", "wasn't ", "nobody would call ", "I would not say ")
    rng = random.Random(0)

    def clause_label(clause: str) -> int:
        adjective = clause.split()[-1]
        return polarity[adjective] ^ int(any(n in clause for n in negations))

    for _ in range(500):
        item = polarity_task._sentence(rng, adjectives)
        text = item["text"][0].lower() + item["text"][1:-1]
        flip = text.startswith("it is not true that ")
        text = text.removeprefix("it is not true that ")
        if text.startswith("although "):
            main = text.split(", ", 1)[1]
        elif ", but " in text:
            main = text.split(", but ", 1)[1]
        elif ", even though " in text:
            main = text.split(", even though ", 1)[0]
        else:
            main = text
        main = main.replace("i would not say", "I would not say")
        assert item["label"] == clause_label(main) ^ int(flip), item


def test_the_pipeline_runs_every_method_with_matched_adapters(tmp_path):
    result = minilm_compare.compare("smoke", ("lora", "fura_normalized", *minilm_compare.METHODS))
    finals = result["finals"]
    assert list(finals) == ["fura", "lora", "fura_normalized", "full", "svd", "svd_random", "head_only"]
    assert all(len(records) == len(result["seeds"]) == 2 for records in finals.values())
    fura, lora = finals["fura"][0], finals["lora"][0]
    assert abs(lora["trainable_params"] - fura["trainable_params"]) / fura["trainable_params"] < 0.05
    assert finals["svd"][0]["max_fit_relative_error"] < 1e-5  # the pretrained basis is lossless
    assert finals["svd_random"][0]["max_fit_relative_error"] > 0.1  # 384 -> 1536 is tall: a projection
    assert finals["head_only"][0]["trainable_params"] == 0
    assert set(result["summary"]["fura_minus"]) == {"fura_normalized", "lora", "full", "svd", "svd_random", "head_only"}
    assert result["versions"]["torch"] == torch.__version__ and result["device"].startswith("CPU")
    text = minilm_compare.table(result, "x/minilm_compare.json")
    assert text.count("\n| ") == len(finals) + 1  # header + one row a method
    minilm_compare.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_the_same_start_for_every_method():
    """Every method starts from the pretrained function: full fine-tuning exactly (fp32); FuRA,
    the SVD baseline and LoRA (B = 0) on the bf16 base within twice the bf16 base's own rounding
    (the frozen encoder), all under the same freshly initialised head."""
    items = polarity_task.make_splits({"test": 8})["test"]
    logits = {}
    for method in ("full", "head_only", "fura", "svd", "lora"):
        model, tokenizer, _, _ = minilm_compare.build(method, seed=0, lora_rank=4)
        model.eval()
        batch = tokenizer([it["text"] for it in items], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits[method] = model(**batch).double()
    minilm_compare._CONVERTED.clear()  # as compare() does when it ends
    fp32 = logits["full"]
    rounding = (logits["head_only"] - fp32).abs().max()
    assert 0 < rounding < 0.05 * fp32.abs().max()  # a bf16 base, close to the fp32 one
    for method in ("fura", "svd", "lora"):
        assert (logits[method] - fp32).abs().max() <= 2 * rounding + 1e-3 * fp32.abs().max(), method


def test_readme_table_comes_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(minilm_compare.START, 1)[1].split(minilm_compare.END, 1)[0].strip()
    source = block.split("Results file [`", 1)[1].split("`]", 1)[0]
    result = json.loads((ROOT / source).read_text())
    assert block == minilm_compare.table(result, source)
    assert result["profile"] == "full" and len(result["seeds"]) == 5
    assert (ROOT / source).with_suffix(".png").exists()
    assert result["split_sizes"]["test"] >= 500
