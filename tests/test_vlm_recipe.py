"""The VLM recipe on a tiny random LLaVA on the CPU: what trains, what stays frozen, reloading."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fura_kernels import FusedBTTLinear
from fura_kernels.recipes import vlm
from fura_kernels.recipes.tiny_llava import make_shapes_dataset, make_tiny_llava

from .helpers import max_rel_err


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def _batch(model_dir, data_dir):
    records = json.loads((data_dir / "data.json").read_text())[:2]
    return vlm.LlavaCollator(AutoProcessor.from_pretrained(model_dir), data_dir)(records)


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_shapes_data_and_collator_mask_the_prompt(tiny_llava, tmp_path):
    data = make_shapes_dataset(tmp_path, count=6)
    records = json.loads(data.read_text())
    assert len(records) == 6 and all((tmp_path / r["image"]).is_file() for r in records)
    batch = _batch(tiny_llava, tmp_path)
    processor = AutoProcessor.from_pretrained(tiny_llava)
    for i in range(2):
        supervised = processor.tokenizer.decode(batch["labels"][i][batch["labels"][i] != vlm.IGNORE_INDEX])
        assert supervised.strip().startswith("It is") and "USER" not in supervised and "<image>" not in supervised


@pytest.mark.parametrize("method", ["fura", "lora", "fura-peft-form"])
def test_recipe_trains_the_language_adapter_and_projector_only(tiny_llava, tmp_path, method):
    peft_form = method == "fura-peft-form"
    method = method.removesuffix("-peft-form")
    metrics = vlm.main(["--model", str(tiny_llava), "--output-dir", str(tmp_path), "--method", method,
                        "--max-steps", "2", "--lr", "1e-2", "--projector-lr", "1e-2", "--cpu", "--no-progress",
                        "--merge", *(["--peft-form"] if peft_form else [])])  # fmt: skip
    assert len(metrics["train_loss"]) == 2
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    base_state, merged_state = base.state_dict(), merged.state_dict()
    vision = [k for k in base_state if "vision_tower" in k]
    assert vision and all(torch.equal(base_state[k], merged_state[k]) for k in vision)  # frozen
    assert torch.equal(base_state["model.language_model.embed_tokens.weight"],
                       merged_state["model.language_model.embed_tokens.weight"])  # fmt: skip
    projector = [k for k in base_state if "multi_modal_projector" in k]
    assert any(not torch.equal(base_state[k], merged_state[k]) for k in projector)  # trained
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base_state[q], merged_state[q])  # the language model's adapter trained
    # The adapter reloads onto a fresh base, and equals the merged model.
    fresh = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    if method == "fura" and not peft_form:
        reloaded = vlm.load_vlm_adapter(fresh, tmp_path / "adapter", progress=False)
        fura = [n for n, m in reloaded.named_modules() if isinstance(m, FusedBTTLinear)]
        assert fura and all(".language_model." in n for n in fura)
    else:
        from peft import PeftModel

        import fura_kernels.peft  # noqa: F401  (a FuRA adapter in PEFT's files needs the method registered)

        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    batch = _batch(tiny_llava, tmp_path / "shapes-data")
    assert max_rel_err(_logits(reloaded, batch), _logits(merged, batch)) < 1e-5
