"""Turn a results file into the README's benchmark table and PNG plots (nothing typed by hand).

python -m bench.report bench/results/<device>/<run>.json [more runs of that device] --readme README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import floors
from .floors import Ceilings
from .results import load

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
# The serving suite's results have a README block of their own (a different run, often another device).
SERVE_START, SERVE_END = "<!-- serve-table:start -->", "<!-- serve-table:end -->"
# The host suite's (`python -m bench host`): launch-only runs on any machine.
HOST_START, HOST_END = "<!-- host-table:start -->", "<!-- host-table:end -->"
BLOCKS = {"bench": (START, END), "serve": (SERVE_START, SERVE_END), "host": (HOST_START, HOST_END)}
# The NF4 kernel rows the README shows: the per-layer passes, decode (1, 16) and training (8192).
KERNEL_TOKENS = (None, 1, 16, 8192)
LAYER_METHODS = (
    "fura",
    "fura_peft",
    "lora_r32",
    "lora_r64",
    "qfura",
    "fura_peft_nf4",
    "qlora_r32",
    "reference",
    "full_ft",
    "dense_floor",
)
# Start and end ceilings further apart than this (relative) mean the machine's speed changed.
CEILING_DRIFT = 0.10


def _ms(rec: dict | None) -> str:
    return f"{rec['time_ms']['median']:.3f}" if rec and rec.get("time_ms") else "n/a"


def _ratio(a: dict | None, b: dict | None, key: str = "time_ms") -> str:
    if not (a and b and a.get(key) and b.get(key)):
        return "n/a"
    return f"{a[key]['median'] / b[key]['median']:.2f}"


def _get(rec: dict | None, key: str) -> str:
    return "n/a" if not rec or rec.get(key) is None else str(rec[key])


# Results files written before the fair configuration existed carry no `configuration`.
CONFIG_TEXT = {
    "fair": "fair configuration (bf16 base weights, fp32 trainables, bf16 autocast, fused AdamW)",
    "pure": "pure configuration (no autocast; PEFT's fp32 adapters run fp32 GEMMs)",
    None: "as first recorded, before the fair configuration (no autocast, PEFT's fp32 adapters)",
}


def _config_text(configuration, rows: list[dict]) -> str:
    if configuration == "fair" and rows and all(r["dtype"] == "float32" for r in rows):
        return "fair configuration at fp32 (fp32 weights and trainables, so no autocast; fused AdamW)"
    return CONFIG_TEXT[configuration]


def _configurations(layer: list[dict]) -> list:
    present = {r.get("configuration") for r in layer}
    return [c for c in ("fair", "pure", None) if c in present]


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.3g}"


def _selection(results: dict) -> str:
    """What a run covered, read off its records (a run can be narrowed by --cases/--tokens)."""
    records = [r for r in results["records"] if r["suite"] != "serve"]
    serve = [r for r in results["records"] if r["suite"] == "serve"]
    shapes = {r["shape"]["name"] for r in records if r.get("shape")}
    tokens = sorted({r["tokens"] for r in records if r.get("tokens") is not None})
    parts = [f"{len(shapes)} layer shapes, T in {{{', '.join(map(str, tokens))}}}"] if records or not serve else []
    if serve:
        batches = sorted({r["serve"]["batch"] for r in serve})
        counts = sorted({r["serve"]["adapters"] for r in serve})
        parts.append(f"serving batches of {', '.join(map(str, batches))} over K in {{{', '.join(map(str, counts))}}}")
    return f"{', '.join(results['suites'])}: {'; '.join(parts)}"


def layer_measure(rows: list[dict]) -> str:
    """What a layer record's `time_ms` holds: forward + backward since the optimizer step was
    split off (`step_time_ms`); before that, the step with its own AdamW."""
    if any("step_time_ms" in r for r in rows):
        return "forward + backward"
    return "training step (forward + backward + AdamW, as recorded before the optimizer step was timed apart)"


def layer_floor(rec: dict, ceilings: dict | None) -> tuple[float, str] | None:
    """(floor ms, path) of a FuRA layer record: as recorded where it names its path; for records
    from before floors named one (which all assumed the activation side), computed again from the
    run's own ceilings on the path the code takes (the weight-side merge where T > out)."""
    if rec.get("floor_path"):
        return rec["floor_ms"], rec["floor_path"]
    shape, tokens = rec.get("shape"), rec.get("tokens")
    if not (shape and tokens and ceilings and rec.get("floor_ms")):
        return None
    c = Ceilings(ceilings["matmul_tflops"] * 1e12, ceilings["copy_gbps"] * 1e9)
    elem = {"float32": 4, "float16": 2, "bfloat16": 2}[rec["dtype"]]
    path = floors.fura_floor_path(rec["method"], tokens, shape["out_features"], shape["n"])
    r = min(shape["b"], shape["out_features"])
    floor = floors.fura_step_floor_ms(tokens, shape["in_features"], shape["out_features"], shape["n"], r, elem, c, path)
    return floor, path


def _floor_text(rec: dict | None, ceilings: dict | None) -> str:
    floor = layer_floor(rec, ceilings) if rec and rec.get("time_ms") else None
    if floor is None:
        return "n/a"
    return f"{100 * floor[0] / rec['time_ms']['median']:.0f}% ({floor[1]})"


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
        f"{env['versions'].get('bitsandbytes')} · commit {env.get('git_commit') or 'unknown'}. Results files:",
        "",
    ]
    lines += [f"- [`{src}`]({src}) (profile `{res['profile']}`; {_selection(res)}"
              + (f"; **partial**: {res.get('partial_reason')}" if res.get("partial") else "") + ")"
              for res, src in runs]  # fmt: skip
    for note in sorted({res["note"] for res, _ in runs if res.get("note")}):
        lines += ["", f"> {note}"]
    records = [rec for res, _ in runs for rec in res["records"]]
    layer = [r for r in records if r["suite"] == "layer"]
    ceilings = next((res["ceilings"] for res, _ in runs if any(r["suite"] == "layer" for r in res["records"])), None)
    for configuration in _configurations(layer):
        rows = [r for r in layer if r.get("configuration") == configuration]
        index = {(r["shape"]["name"], r["tokens"], r["method"]): r for r in rows}
        keys = sorted({(r["shape"]["name"], r["tokens"]) for r in rows})
        lines += [
            "",
            f"Layer {layer_measure(rows)}, {_config_text(configuration, rows)}; median ms, "
            + (
                "eager, synchronised after every step (that run's harness)"
                if configuration is None
                else "eager (steps back to back)"
            )
            + "; ratios are time over time; graphed: the same replayed as CUDA graphs; LoRA is PEFT's. "
            "FuRA % of floor: the roofline of the path FuRA's code takes (weight-side merge or activation-side K1).",
            "",
            "| layer | T | FuRA | PEFT LoRA r=32 | FuRA / LoRA r=32 | with AdamW: FuRA / LoRA r=32 "
            "| graphed FuRA / LoRA r=32 | FuRA % of floor (path) | FuRA / frozen dense "
            "| reference / FuRA | QFuRA | QLoRA r=32 | QFuRA / QLoRA r=32 | launches FuRA / LoRA r=32 "
            "| saved for backward, FuRA / LoRA r=32 (MB) | PEFT form / FuRA | PEFT form / LoRA r=32 "
            "| PEFT form on NF4 / QLoRA r=32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, tokens in keys:
            get = {m: index.get((name, tokens, m)) for m in LAYER_METHODS}
            fura, lora = get["fura"], get["lora_r32"]
            saved = f"{_mb(fura and fura.get('saved_bytes'))} / {_mb(lora and lora.get('saved_bytes'))}"
            launches = f"{_get(fura, 'launches_per_step')} / {_get(lora, 'launches_per_step')}"
            lines.append(
                f"| {name} | {tokens} | {_ms(fura)} | {_ms(lora)} | {_ratio(fura, lora)} | "
                f"{_ratio(fura, lora, 'step_time_ms')} | "
                f"{_ratio(fura, lora, 'graphed_time_ms')} | {_floor_text(fura, ceilings)} | "
                f"{_ratio(fura, get['dense_floor'])} | "
                f"{_ratio(get['reference'], fura)} | {_ms(get['qfura'])} | {_ms(get['qlora_r32'])} | "
                f"{_ratio(get['qfura'], get['qlora_r32'])} | {launches} | {saved} | "
                f"{_ratio(get['fura_peft'], fura)} | {_ratio(get['fura_peft'], lora)} | "
                f"{_ratio(get['fura_peft_nf4'], get['qlora_r32'])} |"
            )
        failed = [r for r in rows if r.get("skipped")]
        if failed:
            notes = [f"{r['method']} on {r['shape']['name']} T={r['tokens']}: {r['skipped'][:80]}" for r in failed[:6]]
            lines += ["", "Failed or skipped: " + "; ".join(notes)]
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
    lines += serve_table(records)
    model = [r for r in records if r["suite"] == "model"]
    if model:
        lines += [
            "",
            "Whole-model SFT step (Llama-shaped, random weights, all seven projections adapted; fair configuration; "
            "LoRA is PEFT's). Spread: p20-p80 over the median; repetitions went on until it was under "
            "5% or their cap (the last column says which).",
            "",
            "| model | tokens | method | timing | Liger | checkpointing | step ms | spread | under 5% | tokens/s "
            "| peak memory (MB) | conversion (s) | trainable params |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in model:
            shape = f"{r['model'].get('batch', '?')}x{r['model'].get('seq', '?')}"
            if r["name"] == "convert":
                took = f"{r['convert_s']:.1f}" if r.get("time_ms") else f"failed: {r.get('skipped', '')[:60]}"
                lines.append(f"| {r['model']['name']} | - | {r['method']} | one conversion (block SVDs) "
                             f"| | | | | | | | {took} | |")  # fmt: skip
                continue
            timing = r.get("timing", "eager") + (f" ({r['compile_mode']})" if r.get("compile_mode") else "")
            liger = "yes" if r.get("liger") else "no"
            ckpt = r["gradient_checkpointing"]
            head = f"| {r['model']['name']} | {shape} | {r['method']} | {timing} | {liger} | {ckpt} | "
            if not r.get("time_ms"):
                lines.append(head + f"failed: {r.get('skipped', '')[:60]} | | | | | | |")
                continue
            t = r["time_ms"]
            met = t.get("spread_target_met")
            met = "n/a" if met is None else ("yes" if met else "no")
            convert = "random cores" if r.get("cores") == "random" else _fmt(r.get("convert_s"))
            lines.append(
                head + f"{t['median']:.1f} | {_spread(t):.1f}% | {met} | "
                f"{r['tokens_per_s']:.0f} | {_mb(r.get('peak_mem_bytes'))} | {convert} | {r['trainable_params']:,} |"
            )
    return "\n".join(lines)


def _serve_index(records: list[dict]) -> dict:
    return {(r["name"], r["serve"]["batch"], r["serve"]["adapters"], r["method"]): r
            for r in records if r["suite"] == "serve"}  # fmt: skip


def serve_overheads(records: list[dict]) -> list[tuple[tuple, float, float]]:
    """`((phase, batch, K), FuRA's overhead, LoRA r=32's)` for every serving case measured for
    all three methods: a mixed batch's time over the base model's (same batch), minus 1."""
    index = _serve_index(records)
    out = []
    for phase, batch, count, method in sorted(index):
        if method != "base":
            continue
        base, fura, lora = (index.get((phase, batch, count, m)) for m in ("base", "fura_mixed", "lora_r32_mixed"))
        if all(r and r.get("time_ms") for r in (base, fura, lora)):
            t = base["time_ms"]["median"]
            out.append(((phase, batch, count), fura["time_ms"]["median"] / t - 1, lora["time_ms"]["median"] / t - 1))
    return out


def overhead_text(overhead: float) -> str:
    """A serving overhead as the table shows it: an adapted batch cannot beat the bare base, so a
    negative one is the noise of the two timings, and says so."""
    return f"{overhead:+.1%}" if overhead >= 0 else f"noise ({overhead:+.1%})"


def serve_table(records: list[dict]) -> list[str]:
    """README lines for the serving suite's records (none without them)."""
    serve = [r for r in records if r["suite"] == "serve"]
    if not serve:
        return []
    index = _serve_index(records)
    spec = serve[0]["serve"]
    context = next((r["serve"]["context"] for r in serve if r["name"] == "decode"), "no")
    lines = [
        "",
        f"Mixed-adapter serving ({spec['model']}: {spec['layers']} layers of hidden size {spec['hidden_size']}, random "
        "weights, all seven projections adapted; each batch's sequences spread round-robin over K adapters; median ms "
        "a step, inside one `adapter_names` context as `generate` runs; decode: one token a sequence after "
        f"{context} tokens of context; prefill: logits of the "
        "last token). Overhead: time over the base model's at the same batch, minus 1; the goal is FuRA's at most "
        "half of LoRA r=32's (PEFT's). A negative overhead is noise: the adapted batch measured faster than the bare "
        "one.",
        "",
        "| phase | tokens a sequence | batch | K | base | FuRA mixed | LoRA r=32 mixed | FuRA overhead "
        "| LoRA r=32 overhead | FuRA / LoRA overhead | adapters on device, FuRA / LoRA (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (phase, batch, count), fura_over, lora_over in serve_overheads(records):
        get = {m: index[(phase, batch, count, m)] for m in ("base", "fura_mixed", "lora_r32_mixed")}
        share = f"{fura_over / lora_over:.2f}" if fura_over >= 0 and lora_over > 0 else "n/a"
        lines.append(
            f"| {phase} | {get['base']['serve']['tokens_per_sequence']} | {batch} | {count} | {_ms(get['base'])} | "
            f"{_ms(get['fura_mixed'])} | {_ms(get['lora_r32_mixed'])} | {overhead_text(fura_over)} | "
            f"{overhead_text(lora_over)} | "
            f"{share} | {_mb(get['fura_mixed'].get('adapter_bytes'))} / "
            f"{_mb(get['lora_r32_mixed'].get('adapter_bytes'))} |"
        )
    failed = [r for r in serve if r.get("skipped")]
    if failed:
        notes = [f"{r['method']} {r['name']} K={r['serve']['adapters']}: {r['skipped'][:80]}" for r in failed[:4]]
        lines += ["", "Failed or skipped: " + "; ".join(notes)]
    return lines


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def _spread(time_ms: dict) -> float:
    """(p80 - p20) / median, in percent: how much repeated steps of one case disagreed."""
    if not time_ms.get("median") or time_ms.get("p80") is None or time_ms.get("p20") is None:
        return float("nan")
    return 100 * (time_ms["p80"] - time_ms["p20"]) / time_ms["median"]


def ceiling_drift(c: dict | None) -> float | None:
    """How far apart (relative, the larger of the two) the ceilings measured at the start and the
    end of a run are; None when they were measured once."""
    repeat = (c or {}).get("repeat")
    if not repeat:
        return None
    return max(abs(repeat[k] / c[k] - 1) for k in ("matmul_tflops", "copy_gbps"))


def _ceiling_drift(c: dict) -> list[str]:
    drift = ceiling_drift(c)
    if drift is None:
        return []
    repeat = c["repeat"]
    line = (f"Measured again at the end: matmul {repeat['matmul_tflops']:.2f} TFLOP/s, copy "
            f"{repeat['copy_gbps']:.1f} GB/s.")  # fmt: skip
    if drift > CEILING_DRIFT:
        line += (f" WARNING: {100 * drift:.0f}% apart from the start: the machine's speed changed during the run "
                 "(other work on it, or its clocks), so these times and ratios are not reliable; rerun on an idle "
                 "machine.")  # fmt: skip
    return [line]


def _model_lines(records: list[dict]) -> list[str]:
    """FuRA's whole-model step against PEFT LoRA r=32's, per model and variant, with both spreads."""
    model = [r for r in records if r["suite"] == "model" and r["name"] == "sft_step" and r.get("time_ms")]
    index = {(r["model"]["name"], r["model"]["batch"], r["model"]["seq"], r.get("timing"), bool(r.get("liger")),
              r["gradient_checkpointing"], r["method"]): r for r in model}  # fmt: skip
    lines = []
    for key, fura in index.items():
        if key[-1] != "fura" or (lora := index.get((*key[:-1], "lora_r32"))) is None:
            continue
        name, batch, seq, timing, liger, ckpt, _ = key
        a, b = fura["time_ms"], lora["time_ms"]
        unsteady = [m for m, t in (("FuRA", a), ("LoRA", b)) if t.get("spread_target_met") is False]
        apart = abs(a["median"] - b["median"]) > max(a["p80"] - a["p20"], b["p80"] - b["p20"])
        lines.append(
            f"  {name} {batch}x{seq} {timing}{' + Liger' if liger else ''}{', checkpointing' if ckpt else ''}: "
            f"FuRA {a['median']:.1f} ms (spread {_spread(a):.1f}%), PEFT LoRA r=32 {b['median']:.1f} ms "
            f"(spread {_spread(b):.1f}%): {a['median'] / b['median']:.2f}x"
            + _busy_text(fura, lora)
            + ("" if apart else "; the difference is inside the spread")
            + (f"; spread over 5% at the cap for {' and '.join(unsteady)}" if unsteady else "")
        )
    return ["", "Whole model, FuRA against PEFT LoRA r=32:", *lines] if lines else []


def _counted(rows: list[dict], key: str, unit: float, width: int, digits: int) -> str:
    """The median of a counted figure, or n/a where the run did not count it (`--timing-only`)."""
    values = [r[key] / unit for r in rows if r.get(key) is not None]
    return f"{_median(values):{width}.{digits}f}" if values else f"{'n/a':>{width}s}"


def _busy_text(fura: dict, lora: dict) -> str:
    """The device-busy fractions of two whole-model records, where the profiler measured them."""
    a, b = (r.get("kernel_profile") or {} for r in (fura, lora))
    if not (a.get("device_busy") and b.get("device_busy")):
        return ""
    return f" (device busy {100 * a['device_busy']:.0f}% / {100 * b['device_busy']:.0f}%)"


def _profile_lines(layer: list[dict]) -> list[str]:
    """The profiler's cross-check of the layer records (GPU runs): the device-busy fraction of
    the eager forward + backward, and a graph replay's kernel time over the eager step's."""
    rows = [r for r in layer if r.get("kernel_profile")]
    if not rows:
        return []
    lines = ["", "torch.profiler's account of the layer steps (medians over shapes and token counts):",
             f"  {'method':12s} {'kernels ms':>10s} {'busy':>6s} {'graph kernels / eager':>22s}"]  # fmt: skip
    for method in LAYER_METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        ratio = [
            r["graphed_kernel_profile"]["kernel_ms"] / r["kernel_profile"]["kernel_ms"]
            for r in mine
            if (r.get("graphed_kernel_profile") or {}).get("kernel_ms") and r["kernel_profile"]["kernel_ms"]
        ]
        busy = [r["kernel_profile"]["device_busy"] for r in mine if r["kernel_profile"].get("device_busy")]
        lines.append(f"  {method:12s} {_median([r['kernel_profile']['kernel_ms'] for r in mine]):10.3f} "
                     f"{100 * _median(busy):5.0f}% {_median(ratio):22.2f}")  # fmt: skip
    lines += _graph_differences(rows)
    return lines


def _graph_differences(rows: list[dict]) -> list[str]:
    """Why a graph replay and the eager step differ, record by record: other kernels (cuBLAS
    picked other algorithms under capture) or the same kernels taking longer (clocks, memory
    placement), told apart by the profiler's kernel names."""
    lines = []
    for r in rows:
        eager, graphed = r["kernel_profile"], r.get("graphed_kernel_profile")
        if not graphed or not eager.get("kernel_ms"):
            continue
        ratio = graphed["kernel_ms"] / eager["kernel_ms"]
        if abs(ratio - 1) <= 0.03:
            continue
        only_eager = sorted(set(eager["top_kernels"]) - set(graphed["top_kernels"]))
        only_graphed = sorted(set(graphed["top_kernels"]) - set(eager["top_kernels"]))
        why = (f"other kernels (eager only: {', '.join(k[:60] for k in only_eager)}; graphed only: "
               f"{', '.join(k[:60] for k in only_graphed)})" if only_eager or only_graphed
               else "the same kernels, slower or faster")  # fmt: skip
        lines.append(f"  {r['method']} on {r['shape']['name']} T={r['tokens']}: graph replay kernels "
                     f"{ratio:.2f}x eager's: {why}")  # fmt: skip
    if not lines:
        return []
    return ["", "Graph replays against eager steps, where their kernel time differs by more than 3%:", *lines]


def summary(results: dict) -> str:
    """What a newcomer should read off a run: the ceilings, how close each kernel came to its
    floor, each method's layer forward + backward, and one closing paragraph on what the figures
    show here. Where the ceilings moved during the run, the figures are not comparable with each
    other, and the closing paragraph says so instead of drawing a verdict."""
    c = results["ceilings"]
    records = results["records"]
    device = results["environment"]["device_name"]
    if c is None:
        lines = ["", f"Ceilings on {device}: not measured (the run stopped first)."]
    else:
        lines = ["", f"Ceilings on {device}: matmul {c['matmul_tflops']:.2f} TFLOP/s ({c['dtype']}), copy "
                 f"{c['copy_gbps']:.1f} GB/s."]  # fmt: skip
        lines += _ceiling_drift(c)
    kernels = [r for r in records if r["suite"] == "kernel" and r.get("time_ms") and r["method"] in ("fura", "qfura")]
    if kernels:
        lines += ["", "Kernels, % of the roofline floor (median over shapes and token counts):"]
        for name in sorted({r["name"] for r in kernels}):
            pcts = [r["pct_of_floor"] for r in kernels if r["name"] == name]
            lines.append(f"  {name:18s} {_median(pcts):6.1f}%   (min {min(pcts):.1f}%, max {max(pcts):.1f}%)")
    layer = [r for r in records if r["suite"] == "layer" and r.get("time_ms")]
    config = next(iter(_configurations(layer)), None)
    layer = [r for r in layer if r.get("configuration") == config]
    ratios = {}
    if layer:
        split = any("step_time_ms" in r for r in layer)
        lines += ["", f"Layer {layer_measure(layer)}, {_config_text(config, layer)}; medians over shapes and token "
                  "counts:",
                  f"  {'method':12s} {'fwd+bwd ms' if split else 'step ms':>10s} {'spread':>7s} "
                  f"{'+ AdamW ms':>10s} {'peak MB':>9s} {'saved MB':>9s} {'GFLOP':>8s} {'launches':>8s} "
                  f"{'/ LoRA r=32':>11s}"]  # fmt: skip
        for method in LAYER_METHODS:
            rows = [r for r in layer if r["method"] == method]
            if not rows:
                continue
            ratio = [r["ratio_vs_lora_r32"] for r in rows if r.get("ratio_vs_lora_r32")]
            ratios[method] = ratio
            with_adam = [r["step_time_ms"]["median"] for r in rows if r.get("step_time_ms")]
            lines.append(
                f"  {method:12s} {_median([r['time_ms']['median'] for r in rows]):10.3f} "
                f"{_median([_spread(r['time_ms']) for r in rows]):6.0f}% "
                f"{_median(with_adam):10.3f} "
                f"{_median([(r.get('peak_mem_bytes') or 0) / 2**20 for r in rows]):9.2f} "
                f"{_counted(rows, 'saved_bytes', 2**20, 9, 2)} {_counted(rows, 'flops_per_step', 1e9, 8, 3)} "
                f"{_counted(rows, 'launches_per_step', 1, 8, 0)} "
                f"{_median(ratio):11.2f}"
            )
        lines += _profile_lines(layer)
    lines += _model_lines(records)
    failed = [r for r in records if r.get("skipped")]
    drift = ceiling_drift(c)
    if drift is not None and drift > CEILING_DRIFT:
        text = (f"not comparable: the machine's speed changed by {100 * drift:.0f}% during the run (its ceilings, "
                "measured at the start and again at the end), so its times and ratios cannot be compared with each "
                "other or with another run, and no verdict is drawn from them; rerun on an idle machine.")  # fmt: skip
    else:
        text = _verdict(ratios, records)
    if failed:
        text += f" {len(failed)} measurements failed or were skipped (see the results file)."
    if results.get("partial"):
        text += f" Partial results: {results.get('partial_reason')}."
    if results.get("note"):
        text += f" {results['note']}"
    lines += ["", "Summary, on this device: " + text]
    return "\n".join(lines)


def _verdict(ratios: dict, records: list[dict]) -> str:
    """The closing sentence of a run whose ceilings held: each FuRA form against the PEFT method it
    replaces, and serving's overheads (a negative one is noise and left out of the share)."""
    verdict = []
    measure = "forward + backward" if any("step_time_ms" in r for r in records if r["suite"] == "layer") else "step"
    if ratios.get("fura"):
        r = ratios["fura"]
        verdict.append(f"FuRA's layer {measure} took {_median(r):.2f}x PEFT LoRA r=32's time (from {min(r):.2f}x to "
                       f"{max(r):.2f}x over {len(r)} shape/token cases)")  # fmt: skip
    if ratios.get("qfura") and ratios.get("qlora_r32"):
        q = [a / b for a, b in zip(ratios["qfura"], ratios["qlora_r32"], strict=False)]
        verdict.append(f"QFuRA's {_median(q):.2f}x PEFT QLoRA r=32's")
    if ratios.get("fura_peft") and ratios.get("fura"):
        p = [a / b for a, b in zip(ratios["fura_peft"], ratios["fura"], strict=False)]
        verdict.append(f"FuRA's PEFT form {_median(p):.2f}x FusedBTTLinear's and {_median(ratios['fura_peft']):.2f}x "
                       "PEFT LoRA r=32's")  # fmt: skip
    if ratios.get("fura_peft_nf4") and ratios.get("qlora_r32"):
        q = [a / b for a, b in zip(ratios["fura_peft_nf4"], ratios["qlora_r32"], strict=False)]
        verdict.append(f"the PEFT form on an NF4 base {_median(q):.2f}x PEFT QLoRA r=32's")
    overheads = serve_overheads(records)
    if overheads:
        shares = [fura / lora for _, fura, lora in overheads if fura >= 0 and lora > 0]
        noise = sum(1 for _, fura, lora in overheads if fura < 0 or lora < 0)
        text = (f"serving mixed batches, FuRA's overhead over the base was at most {max(shares):.2f} of PEFT LoRA "
                f"r=32's (goal: 0.5) over {len(shares)} cases" if shares else "serving mixed batches: no case where "
                "both overheads were above the noise")  # fmt: skip
        if noise:
            text += f" ({noise} with a negative overhead, which is noise, left out)"
        verdict.append(text)
    return "; ".join(verdict) + "." if verdict else "No layer steps were measured."


def plots(results: dict, out_dir: Path) -> list[Path]:
    """Time and saved-for-backward bytes against T, one PNG per layer shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = [r for r in results["records"] if r["suite"] == "layer" and r.get("time_ms")]
    configurations = _configurations(layer)
    layer = [r for r in layer if r.get("configuration") == (configurations[0] if configurations else None)]
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    # Methods that save the same bytes (the Q variants, say) draw on top of each other: each gets
    # its own marker and line style so that every one stays visible.
    dashes = (["-", "--", ":", "-."] * 3)[: len(LAYER_METHODS)]
    styles = {m: (marker, dash) for m, marker, dash in zip(LAYER_METHODS, "osD^vPX*hd", dashes, strict=True)}
    for name in sorted({r["shape"]["name"] for r in layer}):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for method in LAYER_METHODS:
            pts = sorted(((r["tokens"], r) for r in layer if r["shape"]["name"] == name and r["method"] == method),
                         key=lambda point: point[0])  # fmt: skip
            if not pts:
                continue
            ts = [t for t, _ in pts]
            marker, dash = styles[method]
            ax_t.plot(ts, [r["time_ms"]["median"] for _, r in pts], marker=marker, linestyle=dash, label=method)
            saved = [(t, r["saved_bytes"] / 2**20) for t, r in pts if r.get("saved_bytes")]  # log axis: no zeros
            if saved:
                ax_m.plot(*zip(*saved, strict=True), marker=marker, linestyle=dash, label=method, alpha=0.8)
        for ax, ylabel in ((ax_t, "step time, median (ms)"), (ax_m, "saved for backward (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        if ax_m.lines:
            ax_m.legend(fontsize=7)
        fig.suptitle(f"{name} on {results['environment']['device_name']}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{name.replace('/', '_div')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    written += _summary_plots(results, out_dir, plt)
    return written


def _bar(ax, labels, values, ylabel, title):
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def _summary_plots(results: dict, out_dir: Path, plt) -> list[Path]:
    """The three pictures a reader wants first: each method's layer step (time and peak memory),
    each kernel's % of its floor, and the whole model's tokens/s by method."""
    device = results["environment"]["device_name"]
    records = results["records"]
    written = []
    layer = [r for r in records if r["suite"] == "layer" and r.get("time_ms")]
    config = next(iter(_configurations(layer)), None)
    layer = [r for r in layer if r.get("configuration") == config]
    methods = [m for m in LAYER_METHODS if any(r["method"] == m for r in layer)]
    if methods:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        _bar(ax_t, methods, [_median([r["time_ms"]["median"] for r in layer if r["method"] == m]) for m in methods],
             "step time, median over cases (ms)", "layer training step")  # fmt: skip
        _bar(ax_m, methods, [_median([(r.get("peak_mem_bytes") or 0) / 2**20 for r in layer if r["method"] == m])
                             for m in methods], "peak memory (MB)", "peak memory of a step")  # fmt: skip
        fig.suptitle(f"Layer steps by method, {_config_text(config, layer)}, on {device}", fontsize=9)
        written.append(_save(fig, out_dir / "layer_steps_by_method.png", plt))
    kernels = [r for r in records if r["suite"] == "kernel" and r.get("time_ms") and r["method"] in ("fura", "qfura")]
    names = sorted({r["name"] for r in kernels})
    if names:
        fig, ax = plt.subplots(figsize=(7, 4))
        _bar(ax, names, [_median([r["pct_of_floor"] for r in kernels if r["name"] == n]) for n in names],
             "% of the roofline floor (median)", f"kernels against their floors on {device}")  # fmt: skip
        written.append(_save(fig, out_dir / "kernels_pct_of_floor.png", plt))
    model = [r for r in records if r["suite"] == "model" and r.get("time_ms") and not r.get("gradient_checkpointing")]
    if model:
        labels = [f"{r['method']} {r['model']['name']} {r['model']['batch']}x{r['model']['seq']} {r.get('timing', '')}"
                  for r in model]  # fmt: skip
        fig, ax = plt.subplots(figsize=(max(7, len(model) * 0.6), 4.5))
        _bar(ax, labels, [r["tokens_per_s"] for r in model], "tokens/s", f"whole-model SFT step on {device}")
        written.append(_save(fig, out_dir / "model_tokens_per_s.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


HOST_NAMES = {"dense_floor": "frozen dense", "fura": "FuRA", "qfura": "QFuRA", "fura_peft": "PEFT form",
              "fura_peft_nf4": "PEFT form, NF4 base", "lora_r32": "LoRA r=32", "qlora_r32": "QLoRA r=32"}  # fmt: skip
# (FuRA form, the method it replaces, the ratio the targets ask for, or None where only calls are.)
HOST_PAIRS = (("fura", "lora_r32", 0.6), ("qfura", "qlora_r32", 0.6), ("fura_peft", "lora_r32", None),
              ("fura_peft_nf4", "qlora_r32", None))  # fmt: skip
# Whole model: each form's host time over the bare model's, against its baseline's (target 0.5 for FuRA).
MODEL_TARGET = 0.5


def _host_index(records: list[dict]) -> dict:
    return {(r["name"], (r.get("shape") or {}).get("name"), r["configuration"], r["method"]): r
            for r in records if r["suite"] == "host" and r.get("time_ms")}  # fmt: skip


def _us(rec: dict | None, key: str = "host_us") -> str:
    if not rec or not rec.get(key):
        return "n/a"
    t = rec[key]
    return f"{t['median_us']:.1f} ±{100 * t['spread']:.0f}%"


def _model_ms(rec: dict | None, key: str) -> str:
    if not rec or not rec.get(key):
        return "n/a"
    return f"{rec[key]['median_us'] / 1e3:.2f} ±{100 * rec[key]['spread']:.0f}%"


def _host_ratio(a: dict | None, b: dict | None, key: str = "host_us", base: dict | None = None) -> float | None:
    """a / b of host times (median µs), or (a - base) / (b - base) with `base`."""
    if not (a and b and a.get(key) and b.get(key)) or (base is not None and not base.get(key)):
        return None
    floor = base[key]["median_us"] if base is not None else 0.0
    return (a[key]["median_us"] - floor) / (b[key]["median_us"] - floor)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def host_table(results: dict, path: str) -> str:
    """The README block of a host-suite results file (`python -m bench host`)."""
    env = results["environment"]
    records = [r for r in results["records"] if r["suite"] == "host"]
    index = _host_index(records)
    counted = any("instructions" in r for r in records)
    model = results.get("host_model", {})
    lines = [
        f"Machine: **{env['device_name']}** · torch {env['versions'].get('torch')} · triton "
        f"{env['versions'].get('triton')} · transformers {env['versions'].get('transformers')} · peft "
        f"{env['versions'].get('peft')} · bitsandbytes {env['versions'].get('bitsandbytes')} · commit "
        f"{env.get('git_commit') or 'unknown'}. Results file: [`{path}`]({path})"
        + (" (**partial**)" if results.get("partial") else "")
        + ".",
        "",
        f"> {results.get('note', '')}",
        "",
    ]
    cases = list(dict.fromkeys(r["shape"]["name"] for r in records if r["name"] == "layer" and r.get("shape")))
    configurations = [c for c in ("fair", "fp32") if any(r["configuration"] == c for r in records)]
    if cases:
        lines += [
            f"One layer, forward + backward ({records[0]['tokens']} tokens), host µs: the fastest round's median, "
            "± the spread of the round medians; ratios of medians. Calls: Python-level calls of one forward + "
            "backward (`sys.setprofile`)." + (" Instructions: callgrind, per call." if counted else ""),
            "",
        ]
        head = ["layer", "config", *[HOST_NAMES[m] for m in HOST_NAMES]]
        head += ["FuRA / LoRA", "QFuRA / QLoRA", "PEFT form / LoRA", "PEFT NF4 / QLoRA"]
        head += ["Python calls: FuRA / LoRA, QFuRA / QLoRA, PEFT / LoRA, PEFT NF4 / QLoRA"]
        if counted:
            head += ["instructions FuRA / LoRA", "QFuRA / QLoRA"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for case in cases:
            for configuration in configurations:
                row = {m: index.get(("layer", case, configuration, m)) for m in HOST_NAMES}
                cells = [case, configuration, *[_us(row[m]) for m in HOST_NAMES]]
                cells += [_fmt(_host_ratio(row[a], row[b])) for a, b, _ in HOST_PAIRS]
                calls = [f"{row[a]['python_calls']} / {row[b]['python_calls']}" if row[a] and row[b] else "n/a"
                         for a, b, _ in HOST_PAIRS]  # fmt: skip
                cells.append(", ".join(calls))
                if counted:
                    cells += [
                        _fmt(_count_ratio(row[a], row[b])) for a, b in (("fura", "lora_r32"), ("qfura", "qlora_r32"))
                    ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    model_rows = [r for r in records if r["name"] == "model"]
    if model_rows:
        lines += [
            f"Whole model: {model.get('name', 'tiny Llama')} ({model.get('num_hidden_layers', '?')} decoder layers, "
            f"all seven projections adapted, hidden size {model.get('hidden_size', '?')}, {model_rows[0]['tokens']} "
            "tokens), "
            "host ms of an SFT forward + backward and of the step with AdamW(fused=True); over bare: the method's time "
            "minus the frozen base's (bare: backward through every layer to the embeddings), over LoRA's (QLoRA's).",
            "",
        ]
        head = ["config", "measure", *[HOST_NAMES[m] for m in HOST_NAMES], "FuRA over bare / LoRA's",
                "QFuRA over bare / QLoRA's", "PEFT form over bare / LoRA's",
                "PEFT NF4 over bare / QLoRA's"]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for configuration in configurations:
            row = {m: index.get(("model", None, configuration, m)) for m in HOST_NAMES}
            for key, label in (("host_us", "forward + backward"), ("step_host_us", "step")):
                cells = [configuration, label]
                cells += [_model_ms(row[m], key) for m in HOST_NAMES]
                bare = row["dense_floor"]
                cells += [_fmt(_host_ratio(row[a], row[b], key, bare)) for a, b, _ in HOST_PAIRS]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += host_targets(results)
    return "\n".join(lines).rstrip("\n")


def _count_ratio(a: dict | None, b: dict | None, key: str = "instructions") -> float | None:
    if not (a and b and a.get(key) and b.get(key)):
        return None
    return a[key] / b[key]


def host_targets(results: dict) -> list[str]:
    """The host-path targets, read off a host results file: each as a line, met or missed."""
    index = _host_index(results["records"])
    configurations = [c for c in ("fair", "fp32") if any(k[2] == c for k in index)]
    cases = list(dict.fromkeys(k[1] for k in index if k[0] == "layer"))
    lines = ["Targets (layer ratios: the worst layer shape):", ""]
    for configuration in configurations:
        for a, b, goal in HOST_PAIRS:
            rows = [
                (index.get(("layer", c, configuration, a)), index.get(("layer", c, configuration, b))) for c in cases
            ]
            rows = [(x, y) for x, y in rows if x and y]
            if not rows:
                continue
            calls_ok = all(x["python_calls"] <= y["python_calls"] for x, y in rows)
            worst_calls = max(x["python_calls"] - y["python_calls"] for x, y in rows)
            text = (f"- {configuration}: {HOST_NAMES[a]} Python calls <= {HOST_NAMES[b]}'s on every layer: "
                    f"{'met' if calls_ok else 'missed'} (largest difference {worst_calls:+d})")  # fmt: skip
            if goal is not None:
                worst = max(_host_ratio(x, y) for x, y in rows)
                text += f"; host time <= {goal}x: {'met' if worst <= goal else 'missed'} (worst {worst:.2f})"
            lines.append(text)
        for key, label in (("host_us", "forward + backward"), ("step_host_us", "step")):
            fura, lora, bare = (
                index.get(("model", None, configuration, m)) for m in ("fura", "lora_r32", "dense_floor")
            )
            ratio = _host_ratio(fura, lora, key, bare)
            if ratio is not None:
                lines.append(f"- {configuration}, whole model, {label}: FuRA over bare <= {MODEL_TARGET}x LoRA's: "
                             f"{'met' if ratio <= MODEL_TARGET else 'missed'} ({ratio:.2f})")  # fmt: skip
    return lines


def update_readme(readme: Path, text: str, block: str = "bench") -> None:
    """Write `text` between the README's markers of `block` ("bench" or "serve")."""
    start, end = BLOCKS[block]
    content = readme.read_text()
    if start not in content or end not in content:
        raise ValueError(f"{readme}: no {start} ... {end} markers to write the table between")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the benchmark table and plots from results files.")
    parser.add_argument("results", type=Path, nargs="+", help="results JSON files written by fura-bench, one device")
    parser.add_argument("--readme", type=Path, help="README to rewrite between the block's markers")
    parser.add_argument("--block", choices=sorted(BLOCKS), default="bench",
                        help="which README block: bench (the main table), serve (the serving suite's) or host "
                        "(the host suite's)")  # fmt: skip
    parser.add_argument("--plots", type=Path, help="folder for PNG plots (default: beside the first results file)")
    args = parser.parse_args(argv)
    runs = [(load(path), path.as_posix()) for path in args.results]
    if args.block == "host":
        text = host_table(*runs[0])
        if args.readme:
            update_readme(args.readme, text, "host")
        else:
            print(text)
        return
    text = table(runs)
    if args.readme:
        update_readme(args.readme, text, args.block)
    else:
        print(text)
    for results, _ in runs:
        for path in plots(results, args.plots or args.results[0].parent / "plots"):
            print(f"plot: {path}")


if __name__ == "__main__":
    main()
