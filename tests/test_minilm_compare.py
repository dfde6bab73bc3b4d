"""The MiniLM FuRA-versus-LoRA comparison runs, and the README shows its committed results."""

from __future__ import annotations

import json
from pathlib import Path

from fura_kernels.recipes import minilm_compare

ROOT = Path(__file__).resolve().parents[1]


def test_comparison_runs_with_matched_sizes():
    result = minilm_compare.compare(steps=2, lr=5e-4, seed=0)
    fura, lora = result["results"]
    assert fura["method"] == "fura" and lora["method"] == "lora"
    assert abs(lora["trainable_params"] - fura["trainable_params"]) / fura["trainable_params"] < 0.05
    # same base model and data: FuRA's conversion is lossless up to fp32 rounding
    assert fura["held_out_before"]["accuracy"] == lora["held_out_before"]["accuracy"]
    assert abs(fura["held_out_before"]["mean_margin"] - lora["held_out_before"]["mean_margin"]) < 1e-4
    assert result["held_out_triplets"] == 16 and result["train_triplets"] == 32


def test_readme_table_comes_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(minilm_compare.START, 1)[1].split(minilm_compare.END, 1)[0].strip()
    source = block.split("Results file [`", 1)[1].split("`]", 1)[0]
    result = json.loads((ROOT / source).read_text())
    assert block == minilm_compare.table(result, source)
