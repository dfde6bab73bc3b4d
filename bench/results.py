"""Results files: one JSON per run under `bench/results/<device-slug>/`, schema-checked.

A run writes its file as it goes (`ResultsStream`): after every record, atomically, so a run
stopped by a time limit (SIGTERM, or SIGKILL after it) still leaves a valid file holding every
record measured so far. Such a file says `"partial": true` and why; only a run that finished
writes `"partial": false`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema

SCHEMA_PATH = Path(__file__).with_name("results_schema.json")
CPU_NOTE = (
    "CPU run: the PyTorch path (no Triton kernels) at real widths and few tokens, in fp32. These figures say "
    "nothing about GPU speed."
)
# What an unfinished file says until the run either finishes or records why it stopped.
RUNNING = "the run had not finished when this file was written (stopped by a time limit, or still running)"


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate(results: dict) -> None:
    """Raise `jsonschema.ValidationError` if `results` does not follow the schema."""
    jsonschema.validate(results, schema())


def default_path(results: dict, out_dir: Path) -> Path:
    """`out_dir/<device-slug>/<timestamp>_<profile>.json`."""
    env = results["environment"]
    stamp = env["timestamp"].replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    return Path(out_dir) / env["device_slug"] / f"{stamp}_{results['profile']}.json"


def _atomic_write(path: Path, results: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load(path: Path) -> dict:
    results = json.loads(Path(path).read_text())
    validate(results)
    return results


class ResultsStream:
    """A results file kept up to date while a run goes: `add` writes it again after each record.

    `header` holds the file's fields other than `records` and `ceilings`. With `append`, the
    records of a results file already at `path` are kept and the new ones follow (several runs
    of one device into one file: the device check's whole-model steps); that file must come from
    the same device, and if it was partial it stays partial, with its reason."""

    def __init__(self, path: Path, header: dict, append: bool = False) -> None:
        self.path = Path(path)
        self.records: list[dict] = []
        self.results = {**header, "ceilings": None, "records": self.records, "partial": True, "partial_reason": RUNNING}
        self._earlier_reason = None
        if append and self.path.exists():
            earlier = load(self.path)
            mine, theirs = header["environment"]["device_name"], earlier["environment"]["device_name"]
            if mine != theirs:
                raise ValueError(f"{self.path}: holds results of {theirs!r}, not of this device ({mine!r}); "
                                 "append only runs of one device")  # fmt: skip
            self.records.extend(earlier["records"])
            self.results["suites"] = list(dict.fromkeys([*earlier["suites"], *header["suites"]]))
            self.results["ceilings"] = earlier.get("ceilings")
            if earlier.get("partial"):
                self._earlier_reason = f"an earlier run in this file: {earlier.get('partial_reason')}"
        self.write()

    def set_ceilings(self, ceilings: dict) -> None:
        self.results["ceilings"] = ceilings
        self.write()

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        validate(self.results)
        _atomic_write(self.path, self.results)

    def finish(self, partial_reason: str | None = None) -> None:
        """The last write: complete (`partial_reason` None) or stopped early, saying why."""
        reasons = [r for r in (self._earlier_reason, partial_reason) if r]
        self.results["partial"] = bool(reasons)
        self.results["partial_reason"] = "; ".join(reasons) if reasons else None
        if self.results["partial_reason"] is None:
            del self.results["partial_reason"]
        self.write()
