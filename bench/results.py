"""Results files: one JSON per run under `bench/results/<device-slug>/`, schema-checked."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

SCHEMA_PATH = Path(__file__).with_name("results_schema.json")
CPU_NOTE = (
    "CPU run: the PyTorch path (no Triton kernels) at real widths and few tokens, in fp32. These figures say "
    "nothing about GPU speed."
)


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate(results: dict) -> None:
    """Raise `jsonschema.ValidationError` if `results` does not follow the schema."""
    jsonschema.validate(results, schema())


def write(results: dict, out_dir: Path) -> Path:
    validate(results)
    env = results["environment"]
    folder = Path(out_dir) / env["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    stamp = env["timestamp"].replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    path = folder / f"{stamp}_{results['profile']}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return path


def load(path: Path) -> dict:
    results = json.loads(Path(path).read_text())
    validate(results)
    return results
