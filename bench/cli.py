"""`fura-bench` / `python -m bench`: run the benchmark suites and write a results file.

fura-bench --quick                # a short run: on a GPU the quick profile, else cpu-quick
fura-bench                        # the full suite (GPU) / cpu-quick (CPU)
fura-bench --only layers --profile cpu-tiny --out /tmp/results
fura-bench --only layers --cases llama3-8b --tokens 8192 --methods fura,lora_r32 --configurations fair --no-plots
fura-bench --only model --models llama3-8b --methods fura,lora_r32 --compile on --liger both --cores random

The results file is written after every record; a run stopped by SIGTERM (a time limit) or
Ctrl-C says so in the file (`"partial": true`) and exits with status 143 or 130.
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import replace
from pathlib import Path

import torch

from fura_kernels.optional import check_installed

from . import environment, report, results
from .methods import CONFIGURATIONS, METHODS
from .suites import KERNELS, PROFILES, Profile, model_spec, run_suites

SUITES = ("kernels", "layers", "model", "serve")
CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}
COMPILE = {"off": ("eager",), "on": ("eager", "compiled"), "only": ("compiled",)}
LIGER = {"off": (False,), "on": (True,), "both": (False, True)}


class Terminated(BaseException):
    """SIGTERM arrived (a time limit). A BaseException, so no `except Exception` in a suite,
    which records a failing method and goes on, can swallow it."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def _names(text: str, allowed, flag: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise SystemExit(f"fura-bench: {flag} {text!r}: expected a comma-separated list of {', '.join(allowed)}")
    return names


def _pick_profile(args, device: torch.device) -> str:
    if args.profile:
        return args.profile
    if device.type == "cuda":
        return "quick" if args.quick else "full"
    return "cpu-quick"


def _narrowed(profile: Profile, cases: str | None, tokens: str | None) -> Profile:
    """The profile cut down to some layer shapes and token counts (a run that must fit a time
    limit); the results file records what ran."""
    if cases:
        wanted = [w.strip() for w in cases.split(",") if w.strip()]
        kept = [c for c in profile.cases if any(w in c.name for w in wanted)]
        if not kept:
            names = ", ".join(c.name for c in profile.cases)
            raise SystemExit(f"fura-bench: --cases {cases!r} matches none of the profile's shapes ({names})")
        profile = replace(profile, cases=kept)
    if tokens:
        try:
            counts = [int(t) for t in tokens.split(",") if t.strip()]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            raise SystemExit(f"fura-bench: --tokens {tokens!r} is not a comma-separated list of positive integers")
        profile = replace(profile, tokens=counts)
    return profile


def _selected(profile: Profile, args) -> Profile:
    """The profile with the selection flags applied: methods, configurations, kernels, models,
    checkpointing and compilation (each flag left out keeps the profile's own choice)."""
    profile = _narrowed(profile, args.cases, args.tokens)
    changes = {}
    if args.methods:
        changes["methods"] = _names(args.methods, METHODS, "--methods")
    if args.configurations:
        changes["configurations"] = _names(args.configurations, CONFIGURATIONS, "--configurations")
    if args.kernels:
        changes["kernels"] = _names(args.kernels, KERNELS, "--kernels")
    if args.models:
        try:
            changes["models"] = [model_spec(m.strip()) for m in args.models.split(",") if m.strip()]
        except ValueError as err:
            raise SystemExit(f"fura-bench: --models {args.models!r}: {err}") from None
    if args.checkpointing:
        changes["checkpointing"] = CHECKPOINTING[args.checkpointing]
    if args.compile:
        changes["model_timings"] = COMPILE[args.compile]
    if args.compile_backend:
        changes["compile_backend"] = args.compile_backend
    if args.compile_mode:
        changes["compile_mode"] = None if args.compile_mode == "default" else args.compile_mode
    if args.liger:
        changes["liger"] = LIGER[args.liger]
    if args.cores:
        changes["random_cores"] = args.cores == "random"
    if args.kernel_profile:
        changes["kernel_profile"] = () if args.kernel_profile == "none" else tuple(args.kernel_profile.split(","))
    if args.timing_only:
        changes["counts"] = False
    return replace(profile, **changes)


def run(argv: list[str] | None = None) -> Path:
    """Parse `argv`, run the suites, write and report the results; returns the results file."""
    parser = argparse.ArgumentParser(prog="fura-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short profile (quick on a GPU, cpu-quick on a CPU)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="shapes and token counts to run")
    parser.add_argument("--only", choices=SUITES, action="append", help="run only this suite (repeatable)")
    parser.add_argument("--cases", help="comma-separated substrings: keep only the layer shapes whose name holds one")
    parser.add_argument("--tokens", help="comma-separated token counts, replacing the profile's")
    parser.add_argument(
        "--methods", help=f"comma-separated methods of the layer and model suites ({', '.join(METHODS)})"
    )
    parser.add_argument("--configurations", help="comma-separated configurations of the layer suite (fair, pure)")
    parser.add_argument("--kernels", help=f"comma-separated kernel measurements ({', '.join(KERNELS)})")
    parser.add_argument(
        "--models", help="comma-separated whole-model shapes: NAME or NAME:BATCHxSEQ (llama3-8b:1x2048)"
    )
    parser.add_argument(
        "--checkpointing",
        choices=sorted(CHECKPOINTING),
        help="whole-model runs without (off) or with (on) activation checkpointing, or both",
    )
    parser.add_argument(
        "--compile",
        choices=sorted(COMPILE),
        help="whole-model runs under torch.compile too (on), never (off) or only (only)",
    )
    parser.add_argument("--compile-backend", help="torch.compile backend of the compiled runs (default inductor)")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile mode of the compiled runs (reduce-overhead: CUDA graphs)")  # fmt: skip
    parser.add_argument("--liger", choices=sorted(LIGER),
                        help="whole-model runs with Liger-Kernel (on), without (off) or both, as HF Trainer's "
                        "use_liger_kernel=True applies it")  # fmt: skip
    parser.add_argument(
        "--cores",
        choices=("random", "svd"),
        help="FuRA's whole-model cores: random (no SVD; one conversion timed on its own) or svd",
    )
    parser.add_argument("--kernel-profile", help="layer shapes (comma-separated substrings, or none) whose steps are "
                        "cross-checked with torch.profiler on a GPU (default: all)")  # fmt: skip
    parser.add_argument("--timing-only", action="store_true",
                        help="no FLOP, launch or saved-bytes passes and no second ceiling measurement (a timed GPU "
                        "call; the CPU tests check those counts)")  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="write no plots (python -m bench.report makes them)")
    parser.add_argument(
        "--results-file", type=Path, help="write the results exactly here instead of OUT/<device>/<time>_<profile>.json"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the records already in --results-file (same device) and add this run's",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("fura-bench-results"),
                        help="results root (default ./fura-bench-results, untracked; bench/results is for results "
                        "that are committed)")  # fmt: skip
    parser.add_argument("--readme", type=Path, help="also rewrite this README's benchmark table (the serving table "
                        "for --only serve) from the new results")  # fmt: skip
    args = parser.parse_args(argv)

    if args.append and not args.results_file:
        parser.error("--append needs --results-file")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    profile = _selected(PROFILES[_pick_profile(args, device)], args)
    suites = list(args.only or SUITES)
    torch.manual_seed(0)
    header = {"schema_version": 1, "profile": profile.name, "suites": suites,
              "environment": environment.describe(device)}  # fmt: skip
    if device.type == "cpu":
        header["note"] = results.CPU_NOTE
    path = args.results_file or results.default_path(header, args.out)
    stream = results.ResultsStream(path, header, append=args.append)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run_suites(profile, suites, device, dtype, stream)
    except (Terminated, KeyboardInterrupt) as stop:
        why = "SIGTERM (a time limit)" if isinstance(stop, Terminated) else "an interrupt (Ctrl-C)"
        stream.finish(f"stopped by {why} after {len(stream.records)} records")
        print(f"results (partial): {path}")
        raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    stream.finish()
    out = stream.results
    print(f"results: {path}")
    text = report.table([(out, path.as_posix())])
    print(text)
    print(report.summary(out))
    if not args.no_plots:
        # One folder per run, named after its results file: a second run never overwrites the plots.
        for plot in report.plots(out, path.parent / "plots" / path.stem):
            print(f"plot: {plot}")
    if args.readme:
        report.update_readme(args.readme, text, "serve" if suites == ["serve"] else "bench")
    return path


# What the [bench] extra brings; checked first, so a missing one is a one-line install hint
# rather than a traceback halfway through a run.
BENCH_MODULES = ("jsonschema", "matplotlib", "peft")


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`fura-bench`): exit status 0 on success."""
    check_installed(BENCH_MODULES, "bench", "fura-bench")
    run(argv)


if __name__ == "__main__":
    main()
