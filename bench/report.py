"""Turn a results file into the README's benchmark table and PNG plots (nothing typed by hand).

python -m bench.report bench/results/<device>/<run>.json [more runs of that device] --readme README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .results import load

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
# The NF4 kernel rows the README shows: the per-layer passes, decode (1, 16) and training (8192).
KERNEL_TOKENS = (None, 1, 16, 8192)
LAYER_METHODS = ("fura", "lora_r32", "qfura", "qlora_r32", "reference", "full_ft", "dense_floor")


def _ms(rec: dict | None) -> str:
    return f"{rec['time_ms']['median']:.3f}" if rec and rec.get("time_ms") else "n/a"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not (a and b and a.get("time_ms") and b.get("time_ms")):
        return "n/a"
    return f"{a['time_ms']['median'] / b['time_ms']['median']:.2f}"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.3g}"


def _selection(results: dict) -> str:
    """What a run covered, read off its records (a run can be narrowed by --cases/--tokens)."""
    shapes = {r["shape"]["name"] for r in results["records"] if r.get("shape")}
    tokens = sorted({r["tokens"] for r in results["records"] if r.get("tokens") is not None})
    return f"{', '.join(results['suites'])}: {len(shapes)} layer shapes, T in {{{', '.join(map(str, tokens))}}}"


def _timing(rec: dict) -> str:
    return {"cuda-graph": "CUDA graph", "eager": "eager"}.get(rec.get("timing"), "eager, synced per call")


def table(runs: list[tuple[dict, str]]) -> str:
    """The README block for one or more results files of one device: `runs` pairs each
    loaded file with its path as the README should link it."""
    devices = {results["environment"]["device_name"] for results, _ in runs}
    if len(devices) != 1:
        raise ValueError(f"bench.report.table: results from several devices {sorted(devices)}; expected one")
    env = runs[0][0]["environment"]
    lines = [
        f"Device: **{env['device_name']}** · torch {env['versions'].get('torch')} · triton "
        f"{env['versions'].get('triton')} · peft {env['versions'].get('peft')} · bitsandbytes "
        f"{env['versions'].get('bitsandbytes')}. Results files:",
        "",
    ]
    lines += [f"- [`{src}`]({src}) (profile `{res['profile']}`; {_selection(res)})" for res, src in runs]
    for note in sorted({res["note"] for res, _ in runs if res.get("note")}):
        lines += ["", f"> {note}"]
    records = [rec for res, _ in runs for rec in res["records"]]
    layer = [r for r in records if r["suite"] == "layer"]
    if layer:
        index = {(r["shape"]["name"], r["tokens"], r["method"]): r for r in layer}
        keys = sorted({(r["shape"]["name"], r["tokens"]) for r in layer})
        lines += [
            "",
            "Layer training step (forward + backward + AdamW), median ms; ratios are time over time.",
            "",
            "| layer | T | FuRA | LoRA r=32 | FuRA / LoRA r=32 | FuRA / frozen dense | reference / FuRA "
            "| QFuRA | QLoRA r=32 | QFuRA / QLoRA r=32 | saved for backward, FuRA / LoRA r=32 (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, tokens in keys:
            get = {m: index.get((name, tokens, m)) for m in LAYER_METHODS}
            fura, lora = get["fura"], get["lora_r32"]
            saved = f"{_mb(fura and fura.get('saved_bytes'))} / {_mb(lora and lora.get('saved_bytes'))}"
            lines.append(
                f"| {name} | {tokens} | {_ms(fura)} | {_ms(lora)} | {_ratio(fura, lora)} | "
                f"{_ratio(fura, get['dense_floor'])} | {_ratio(get['reference'], fura)} | {_ms(get['qfura'])} | "
                f"{_ms(get['qlora_r32'])} | {_ratio(get['qfura'], get['qlora_r32'])} | {saved} |"
            )
    ours = [r for r in records if r["suite"] == "kernel" and r["method"] == "qfura" and r["tokens"] in KERNEL_TOKENS]
    theirs = {(r["name"], r["shape"]["name"], r["tokens"]): r for r in records
              if r["suite"] == "kernel" and r["method"] == "bitsandbytes"}  # fmt: skip
    pairs = [(r, theirs[key]) for r in ours if (key := (r["name"], r["shape"]["name"], r["tokens"])) in theirs]
    if pairs:
        lines += [
            "",
            "NF4 kernels against bitsandbytes on the same packed core (median ms; % of floor is the "
            "roofline time over ours).",
            "",
            "| kernel | layer | T | QFuRA | bitsandbytes | QFuRA / bitsandbytes | QFuRA % of floor | timing |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for rec, other in pairs:
            tokens = "-" if rec["tokens"] is None else rec["tokens"]
            lines.append(
                f"| {rec['name']} | {rec['shape']['name']} | {tokens} | {_ms(rec)} | {_ms(other)} | "
                f"{_ratio(rec, other)} | {rec['pct_of_floor']:.1f} | {_timing(rec)} |"
            )
    model = [r for r in records if r["suite"] == "model"]
    if model:
        lines += [
            "",
            "Whole-model SFT step (Llama-shaped, random weights, all seven projections adapted).",
            "",
            "| model | method | checkpointing | tokens/s | peak memory (MB) | conversion (s) | trainable params |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in model:
            if not r.get("time_ms"):
                lines.append(f"| {r['model']['name']} | {r['method']} | {r['gradient_checkpointing']} | "
                             f"skipped: {r.get('skipped', '')[:60]} | | | |")  # fmt: skip
                continue
            lines.append(
                f"| {r['model']['name']} | {r['method']} | {r['gradient_checkpointing']} | {r['tokens_per_s']:.0f} | "
                f"{_mb(r.get('peak_mem_bytes'))} | {r['convert_s']:.2f} | {r['trainable_params']:,} |"
            )
    return "\n".join(lines)


def plots(results: dict, out_dir: Path) -> list[Path]:
    """Time and saved-for-backward bytes against T, one PNG per layer shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = [r for r in results["records"] if r["suite"] == "layer" and r.get("time_ms")]
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted({r["shape"]["name"] for r in layer}):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for method in LAYER_METHODS:
            pts = sorted((r["tokens"], r) for r in layer if r["shape"]["name"] == name and r["method"] == method)
            if not pts:
                continue
            ts = [t for t, _ in pts]
            ax_t.plot(ts, [r["time_ms"]["median"] for _, r in pts], marker="o", label=method)
            saved = [(t, r["saved_bytes"] / 2**20) for t, r in pts if r.get("saved_bytes")]  # log axis: no zeros
            if saved:
                ax_m.plot(*zip(*saved, strict=True), marker="o", label=method)
        for ax, ylabel in ((ax_t, "step time, median (ms)"), (ax_m, "saved for backward (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.suptitle(f"{name} on {results['environment']['device_name']}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{name.replace('/', '_div')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if START not in content or END not in content:
        raise ValueError(f"{readme}: no {START} ... {END} markers to write the table between")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the benchmark table and plots from results files.")
    parser.add_argument("results", type=Path, nargs="+", help="results JSON files written by fura-bench, one device")
    parser.add_argument("--readme", type=Path, help="README to rewrite between the bench-table markers")
    parser.add_argument("--plots", type=Path, help="folder for PNG plots (default: beside the first results file)")
    args = parser.parse_args(argv)
    runs = [(load(path), path.as_posix()) for path in args.results]
    text = table(runs)
    if args.readme:
        update_readme(args.readme, text)
    else:
        print(text)
    for results, _ in runs:
        for path in plots(results, args.plots or args.results[0].parent / "plots"):
            print(f"plot: {path}")


if __name__ == "__main__":
    main()
