"""Write a tiny random Llama and a byte-level tokenizer to a folder, for offline smoke runs.

    python -m fura_kernels.recipes.tiny_model /tmp/tiny-llama

No model hub is needed: the weights are random (from a transformers config) and the tokenizer is
a byte-level BPE trained on the recipe's shipped instruction data.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch


def shipped_data_path() -> Path:
    """The small instruction data set that ships with the recipes (LLM-Adapters format)."""
    return Path(str(resources.files("fura_kernels.recipes") / "data" / "commonsense_tiny.json"))


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(directory: str | Path, hidden_size: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Every projection width is a multiple of 64, as bitsandbytes' CPU 4-bit kernels need."""
    from transformers import LlamaConfig, LlamaForCausalLM

    examples = json.loads(shipped_data_path().read_text())
    texts = [" ".join(e.values()) for e in examples]
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    print(make_tiny_llama(args.directory, args.hidden_size, args.layers))


if __name__ == "__main__":
    main()
