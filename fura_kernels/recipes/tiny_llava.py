"""A tiny random LLaVA (CLIP-style vision tower, projector, tiny Llama) with its processor, and a
synthetic image-instruction set drawn with Pillow: offline smoke runs of the VLM recipe.

    python -m fura_kernels.recipes.tiny_llava /tmp/tiny-llava
    python -m fura_kernels.recipes.tiny_llava /tmp/shapes --data

The images are coloured shapes (circle, square, triangle) on a plain background; each record asks
for the shape or the colour, in LLaVA's conversation JSON (`image`, `conversations` of `human` /
`gpt` turns, `<image>` in the first human turn).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ..optional import check_installed
from .tiny_model import build_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"shape": "What shape is in the picture?", "colour": "What colour is the shape?"}


def _draw(shape: str, colour: tuple[int, int, int], rng: random.Random, size: int = 64):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    margin = rng.randint(6, 14)
    box = (margin, margin, size - margin, size - margin)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)], fill=colour)
    return image


def make_shapes_dataset(directory: str | Path, count: int = 48, seed: int = 0) -> Path:
    """Write `count` shape images and `data.json` (LLaVA conversation format) to `directory`."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"images/{i:04d}_{colour}_{shape}.png"
        _draw(shape, COLOURS[colour], rng).save(directory / name)
        kind = rng.choice(list(QUESTIONS))
        answer = f"It is a {shape}." if kind == "shape" else f"It is {colour}."
        turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTIONS[kind]}"}, {"from": "gpt", "value": answer}]
        records.append({"id": f"shapes-{i:04d}", "image": name, "conversations": turns})
    (directory / "data.json").write_text(json.dumps(records, indent=1) + "\n")
    return directory / "data.json"


def _image_processor():
    try:  # the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return processor_class(size={"shortest_edge": IMAGE_SIZE}, crop_size=size, do_center_crop=True)


def make_tiny_llava(directory: str | Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random LLaVA with a 2-layer CLIP-style vision tower (32 px, 8 px patches: 16 image
    tokens) and a tiny Llama; projection widths are multiples of 64 for QFuRA and bitsandbytes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    texts = [f"{q} It is a {s}. It is {c}." for q in QUESTIONS.values() for s in SHAPES for c in COLOURS]
    texts += ["USER: ASSISTANT:", "A chat between a curious user and an assistant."]
    tokenizer = build_tokenizer(texts, vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(image_processor=_image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)  # fmt: skip
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--data", action="store_true", help="write the synthetic shapes data set instead")
    parser.add_argument("--count", type=int, default=48)
    args = parser.parse_args(argv)
    check_installed(("PIL",), "vlm", "python -m fura_kernels.recipes.tiny_llava")
    print(make_shapes_dataset(args.directory, args.count) if args.data else make_tiny_llava(args.directory))


if __name__ == "__main__":
    main()
