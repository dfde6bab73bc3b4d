"""The benchmark harness end to end in CPU mode at tiny shapes: run, validate, report, plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from bench import cli, report, results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--out", str(out)])
    return path, json.loads(path.read_text())


def test_cpu_run_writes_a_valid_labelled_results_file(tiny_run):
    path, data = tiny_run
    results.validate(data)
    assert path.parent.name == data["environment"]["device_slug"] and path.parent.name.startswith("cpu-")
    assert data["note"] == results.CPU_NOTE and data["environment"]["device_kind"] == "cpu"
    assert data["environment"]["versions"]["torch"] and data["environment"]["versions"]["peft"]
    assert data["ceilings"]["matmul_tflops"] > 0 and data["ceilings"]["copy_gbps"] > 0
    suites = {r["suite"] for r in data["records"]}
    assert suites == {"kernel", "layer", "model", "serve"}
    records = [r for r in data["records"] if r["suite"] == "layer"]
    assert {r["configuration"] for r in records} == {"fair", "pure"}  # both, each recorded
    layer = {(r["method"], r["tokens"]): r for r in records if r["configuration"] == "fair"}
    for method in ("dense_floor", "fura", "fura_peft", "qfura", "fura_peft_nf4", "lora_r32", "lora_r64", "qlora_r32",
                   "reference", "full_ft"):  # fmt: skip
        rec = layer[(method, 64)]
        assert rec["time_ms"]["median"] > 0, method
        assert rec["ratio_vs_lora_r32"] is not None and rec["ratio_vs_dense"] is not None
        # CPU peak memory is a real measurement now, as are launches and FLOPs; host time is not
        # (on a CPU it would be the step time itself: the launch-only host suite measures it)
        assert rec["peak_mem_bytes"] > 0 and rec["launches_per_step"] > 0 and rec["host_ms"] is None, method
        assert rec["flops_per_step"] > 0 and rec["step_time_ms"]["median"] > 0, method
    assert layer[("fura", 64)]["launches_per_step"] <= layer[("lora_r32", 64)]["launches_per_step"]
    # FuRA trains R and S only: in*(b+1) numbers for this layer; LoRA r=32 trains r*(in+out).
    shape = layer[("fura", 64)]["shape"]
    assert layer[("fura", 64)]["trainable_params"] == shape["in_features"] * (shape["b"] + 1)
    assert layer[("lora_r32", 64)]["trainable_params"] == 32 * (shape["in_features"] + shape["out_features"])
    # The PEFT form trains the same R and S (no bias: the benchmarked base has none), in both bases.
    for method in ("fura_peft", "fura_peft_nf4"):
        assert layer[(method, 64)]["trainable_params"] == layer[("fura", 64)]["trainable_params"], method
    # The reference algorithm keeps more for backward than the fused Function (L ⊙ S and more).
    assert layer[("reference", 64)]["saved_bytes"] > layer[("fura", 64)]["saved_bytes"]
    kernels = {r["name"] for r in data["records"] if r["suite"] == "kernel"}
    assert kernels == {"K1", "K3", "weight_merge", "nf4_dequant", "nf4_small_t_gemm"}
    assert all(r["pct_of_floor"] > 0 for r in data["records"] if r["suite"] == "kernel")


def test_report_regenerates_table_and_plots(tiny_run, tmp_path):
    path, data = tiny_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.main([str(path), "--readme", str(readme), "--plots", str(tmp_path / "plots")])
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    assert data["environment"]["device_name"] in text and "| llama3-8b.q_proj/32 | 64 |" in text
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_schema_rejects_a_malformed_file(tiny_run):
    _, data = tiny_run
    broken = json.loads(json.dumps(data))
    broken["records"][0]["time_ms"] = {"median": -1.0, "p20": 0, "p80": 0, "reps": 1}
    with pytest.raises(jsonschema.ValidationError):
        results.validate(broken)
    del broken["environment"]
    with pytest.raises(jsonschema.ValidationError):
        results.validate(broken)


def test_readme_table_is_generated_from_a_committed_results_file():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(report.START, 1)[1].split(report.END, 1)[0].strip()
    sources = re.findall(r"^- \[`([^`]+)`\]", block, flags=re.MULTILINE)
    assert sources, "the README table names no results file"
    for source in sources:
        assert (ROOT / source).is_file(), f"README table points to {source}, which is not in the repository"
    assert block == report.table([(results.load(ROOT / source), source) for source in sources])


def test_readme_serving_table_is_generated_from_a_committed_results_file():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(report.SERVE_START, 1)[1].split(report.SERVE_END, 1)[0].strip()
    sources = re.findall(r"^- \[`([^`]+)`\]", block, flags=re.MULTILINE)
    assert sources, "the README serving table names no results file"
    loaded = [(results.load(ROOT / source), source) for source in sources]
    assert all(r["suite"] == "serve" for data, _ in loaded for r in data["records"])
    assert block == report.table(loaded)
    assert "| decode | 1 | 64 | 16 |" in block and "| prefill |" in block  # every K, both phases


def test_readme_host_table_is_generated_from_a_committed_results_file():
    """The host block is `bench.report`'s rendering of the one committed host file it names."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split(report.HOST_START, 1)[1].split(report.HOST_END, 1)[0].strip()
    sources = re.findall(r"Results file: \[`([^`]+)`\]", block)
    assert len(sources) == 1, f"the README host table must name one results file, it names {sources}"
    assert (ROOT / sources[0]).is_file(), f"README host table points to {sources[0]}, which is not in the repository"
    data = results.load(ROOT / sources[0])
    assert data["suites"] == ["host"] and not data.get("partial")
    assert block == report.host_table(data, sources[0])


def test_serving_suite_records_its_configuration(tmp_path):
    """The serving suite on the CPU: every (method, phase, K) timed, with what it ran recorded."""
    path = cli.run(["--profile", "cpu-tiny", "--only", "serve", "--device", "cpu", "--no-plots",
                    "--results-file", str(tmp_path / "serve.json")])  # fmt: skip
    data = results.load(path)
    records = data["records"]
    assert data["suites"] == ["serve"] and not any(r.get("skipped") for r in records)
    assert {(r["method"], r["name"], r["serve"]["adapters"]) for r in records} == {
        (m, p, k) for m in ("base", "fura_mixed", "lora_r32_mixed") for p in ("decode", "prefill") for k in (1, 4)
    }
    for r in records:
        assert set(r["serve"]) >= {
            "model",
            "layers",
            "hidden_size",
            "batch",
            "adapters",
            "tokens_per_sequence",
            "context",
        }
        assert r["tokens_per_s"] > 0 and (r["adapter_bytes"] == 0) == (r["method"] == "base")
    fura = {r["serve"]["adapters"]: r["adapter_bytes"] for r in records if r["method"] == "fura_mixed"}
    assert fura[4] == 4 * fura[1] > 0  # adapters cost the same each; the base is stored once
    assert len(report.serve_overheads(records)) == 4
    assert "Mixed-adapter serving" in report.table([(data, "serve.json")])


def test_narrowed_run_and_a_table_from_two_files(tiny_run, tmp_path):
    """--cases/--tokens cut a run down (for a device time limit); the README block can combine
    several runs of one device and says what each covered; bad selections are refused."""
    path, data = tiny_run
    narrow = cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--only", "kernels", "--cases", "q_proj",
                      "--tokens", "3", "--out", str(tmp_path)])  # fmt: skip
    narrowed = results.load(narrow)
    assert {r["tokens"] for r in narrowed["records"] if r["tokens"] is not None} == {3}
    assert {r["suite"] for r in narrowed["records"]} == {"kernel"}
    text = report.table([(data, "a.json"), (narrowed, "b.json")])
    assert "- [`a.json`](a.json)" in text and "(profile `cpu-tiny`; kernels: 1 layer shapes, T in {3})" in text
    other = json.loads(json.dumps(narrowed))
    other["environment"]["device_name"] = "Another device"
    with pytest.raises(ValueError, match="several devices"):
        report.table([(data, "a.json"), (other, "c.json")])
    for bad in (["--cases", "no_such_layer"], ["--tokens", "0"], ["--tokens", "x"]):
        with pytest.raises(SystemExit, match="fura-bench: --"):
            cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--out", str(tmp_path), *bad])


def test_summary_says_what_the_run_shows(tiny_run):
    _, data = tiny_run
    # As an idle machine measures it (ceilings equal at both ends): a loaded one gets no verdict,
    # which tests/test_bench_method.py checks.
    data = json.loads(json.dumps(data))
    data["ceilings"]["repeat"] = {k: data["ceilings"][k] for k in ("matmul_tflops", "copy_gbps")}
    text = report.summary(data)
    assert f"Ceilings on {data['environment']['device_name']}" in text and "TFLOP/s" in text
    assert "Kernels, % of the roofline floor" in text and "K3" in text
    assert re.search(r"fura\s+[\d.]+\s+[\d.]+", text)  # a row per method, with step ms and peak MB
    assert "Summary, on this device: FuRA's layer forward + backward took" in text and results.CPU_NOTE in text
    assert "Whole model, FuRA against PEFT LoRA r=32:" in text


def test_summary_plots_are_written(tiny_run, tmp_path):
    _, data = tiny_run
    names = {p.name for p in report.plots(data, tmp_path)}
    assert {"layer_steps_by_method.png", "kernels_pct_of_floor.png", "model_tokens_per_s.png"} <= names


def test_a_failing_method_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    from bench import suites

    real_build = suites.build

    def build(method, *args, **kwargs):
        if method == "lora_r64":
            raise RuntimeError("simulated failure")
        return real_build(method, *args, **kwargs)

    monkeypatch.setattr(suites, "build", build)
    path = cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--only", "layers", "--tokens", "3",
                    "--out", str(tmp_path)])  # fmt: skip
    records = json.loads(path.read_text())["records"]
    failed = [r for r in records if r["method"] == "lora_r64"]
    assert failed and all("simulated failure" in r["skipped"] for r in failed)
    assert all(r.get("time_ms") for r in records if r["method"] == "fura")


def test_results_go_to_an_untracked_directory_by_default(monkeypatch, tmp_path):
    """With no --out, results and plots land in ./fura-bench-results, which git ignores, so a
    newcomer's run leaves `git status` clean (it used to rewrite tracked plots)."""
    monkeypatch.chdir(tmp_path)
    path = cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--only", "kernels", "--tokens", "3"])
    assert path.resolve().is_relative_to(tmp_path / "fura-bench-results")
    assert list((tmp_path / "fura-bench-results").rglob("*.png"))
    assert "/fura-bench-results/" in (ROOT / ".gitignore").read_text().split()


def test_selection_flags_run_exactly_what_they_name(tmp_path):
    """--methods, --configurations, --kernels, --models, --checkpointing, --compile and --no-plots
    cut a run down to what a time-limited call asks for; --results-file puts it where asked."""
    path = cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--only", "layers", "--only", "kernels", "--tokens",
                    "3", "--methods", "fura,lora_r32", "--configurations", "fair", "--kernels", "K3,weight_merge",
                    "--no-plots", "--results-file", str(tmp_path / "one.json")])  # fmt: skip
    assert path == tmp_path / "one.json" and not list(tmp_path.rglob("*.png"))
    data = results.load(path)
    assert data["partial"] is False
    layer = [r for r in data["records"] if r["suite"] == "layer"]
    assert {(r["method"], r["configuration"]) for r in layer} == {("fura", "fair"), ("lora_r32", "fair")}
    assert layer[0]["ratio_vs_lora_r32"] is not None  # ratios still computed within the selection
    assert {r["name"] for r in data["records"] if r["suite"] == "kernel"} == {"K3", "weight_merge"}
    model = cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--only", "model", "--models", "tiny-llama:1x16",
                     "--methods", "fura", "--checkpointing", "on", "--compile", "off", "--liger", "off", "--no-plots",
                     "--results-file", str(tmp_path / "one.json"), "--append"])  # fmt: skip
    both = results.load(model)
    runs = [r for r in both["records"] if r["suite"] == "model"]
    assert len(runs) == 1 and runs[0]["method"] == "fura" and runs[0]["gradient_checkpointing"] is True
    assert runs[0]["model"]["batch"] == 1 and runs[0]["model"]["seq"] == 16 and runs[0]["timing"] == "eager"
    assert len(both["records"]) == len(data["records"]) + 1 and both["suites"] == ["layers", "kernels", "model"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--methods", "fura,dora"], "--methods"),
        (["--kernels", "K2"], "--kernels"),
        (["--configurations", "mixed"], "--configurations"),
        (["--models", "llama9"], "unknown model"),
        (["--models", "tiny-llama:2by32"], "BATCHxSEQ"),
    ],
)
def test_selection_flags_refuse_what_does_not_exist(tmp_path, bad, message):
    with pytest.raises(SystemExit, match=message):
        cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--out", str(tmp_path), *bad])


def test_append_refuses_another_device(tiny_run, tmp_path):
    _, data = tiny_run
    other = json.loads(json.dumps(data))
    other["environment"]["device_name"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "gpu.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="not of this device"):
        cli.run(["--profile", "cpu-tiny", "--device", "cpu", "--only", "kernels", "--tokens", "3",
                 "--results-file", str(tmp_path / "gpu.json"), "--append"])  # fmt: skip


def test_a_stream_stopped_early_is_a_valid_partial_file(tiny_run, tmp_path):
    """What a killed run leaves: every record so far, `partial` with the reason; before the
    ceilings are measured, none (null), and the report still reads it."""
    _, data = tiny_run
    header = {k: data[k] for k in ("schema_version", "profile", "suites", "environment")}
    stream = results.ResultsStream(tmp_path / "run.json", header)
    early = results.load(tmp_path / "run.json")
    assert early["partial"] is True and early["ceilings"] is None and early["records"] == []
    stream.set_ceilings(data["ceilings"])
    stream.add(data["records"][0])
    stream.finish("stopped by SIGTERM (a time limit) after 1 records")
    done = results.load(tmp_path / "run.json")
    assert done["partial"] is True and "SIGTERM" in done["partial_reason"] and len(done["records"]) == 1
    assert "**partial**" in report.table([(done, "run.json")]) and "Partial results" in report.summary(done)
    complete = dict(done, partial=False, ceilings=None)
    with pytest.raises(jsonschema.ValidationError):  # only a partial file may lack ceilings
        results.validate(complete)


def test_the_summary_shows_the_spread_and_warns_when_the_ceilings_moved(tiny_run):
    """A busy machine moved the quick run's ratios without a sign: the start and end ceilings
    are both recorded, and the summary warns when they disagree by more than 10%."""
    _, data = tiny_run
    repeat = data["ceilings"]["repeat"]
    assert repeat["matmul_tflops"] > 0 and repeat["copy_gbps"] > 0
    busy = json.loads(json.dumps(data))
    busy["ceilings"]["repeat"] = {"matmul_tflops": 0.6 * data["ceilings"]["matmul_tflops"],
                                  "copy_gbps": data["ceilings"]["copy_gbps"]}  # fmt: skip
    idle = json.loads(json.dumps(data))
    idle["ceilings"]["repeat"] = {k: data["ceilings"][k] for k in ("matmul_tflops", "copy_gbps")}
    assert "WARNING: 40% apart from the start" in report.summary(busy)
    assert "WARNING" not in report.summary(idle)
    text = report.summary(data)
    assert " spread " in text and "lora_r64" in text  # measured, so shown


def test_each_run_keeps_its_plots_and_every_panel_has_a_legend(tiny_run, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    path, data = tiny_run
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    written = report.plots(data, tmp_path / "plots")
    shape_figures = [f for f in figures if len(f.axes) == 2 and f.axes[0].get_xscale() == "log"]
    assert shape_figures
    for fig in shape_figures:
        time_ax, saved_ax = fig.axes
        assert time_ax.get_legend() is not None and saved_ax.get_legend() is not None
        styles = [(line.get_marker(), line.get_linestyle()) for line in saved_ax.lines]
        assert len(set(styles)) == len(styles)  # overlapping lines stay distinguishable
        assert "lora_r64" in [t.get_text() for t in time_ax.get_legend().get_texts()]
    assert written
    # The command line puts each run's plots in a folder named after its results file.
    assert (path.parent / "plots" / path.stem).is_dir()
