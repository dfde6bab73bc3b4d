"""`fura-bench` / `python -m bench`: run the benchmark suites and write a results file.

fura-bench --quick                # a short run: on a GPU the quick profile, else cpu-quick
fura-bench                        # the full suite (GPU) / cpu-quick (CPU)
fura-bench --only layers --profile cpu-tiny --out /tmp/results
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from fura_kernels.optional import check_installed

from . import environment, report, results
from .suites import PROFILES, Profile, run_suites

SUITES = ("kernels", "layers", "model")


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


def run(argv: list[str] | None = None) -> Path:
    """Parse `argv`, run the suites, write and report the results; returns the results file."""
    parser = argparse.ArgumentParser(prog="fura-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short profile (quick on a GPU, cpu-quick on a CPU)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="shapes and token counts to run")
    parser.add_argument("--only", choices=SUITES, action="append", help="run only this suite (repeatable)")
    parser.add_argument("--cases", help="comma-separated substrings: keep only the layer shapes whose name holds one")
    parser.add_argument("--tokens", help="comma-separated token counts, replacing the profile's")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("fura-bench-results"),
                        help="results root (default ./fura-bench-results, untracked; bench/results is for results "
                        "that are committed)")  # fmt: skip
    parser.add_argument("--readme", type=Path, help="also rewrite this README's benchmark table from the new results")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    profile = _narrowed(PROFILES[_pick_profile(args, device)], args.cases, args.tokens)
    suites = list(args.only or SUITES)
    torch.manual_seed(0)
    run = run_suites(profile, suites, device, dtype)
    out = {
        "schema_version": 1,
        "profile": profile.name,
        "suites": suites,
        "environment": environment.describe(device),
        **run,
    }
    if device.type == "cpu":
        out["note"] = results.CPU_NOTE
    path = results.write(out, args.out)
    print(f"results: {path}")
    text = report.table([(out, path.as_posix())])
    print(text)
    print(report.summary(out))
    for plot in report.plots(out, path.parent / "plots"):
        print(f"plot: {plot}")
    if args.readme:
        report.update_readme(args.readme, text)
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
