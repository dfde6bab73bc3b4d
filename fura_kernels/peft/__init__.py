"""FuRA as a PEFT method: `import fura_kernels.peft`, then use PEFT as with LoRA.

    import fura_kernels.peft  # registers the method with PEFT
    from fura_kernels.peft import FuRAPeftConfig
    from peft import get_peft_model, PeftModel

    model = get_peft_model(model, FuRAPeftConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    ...
    model.save_pretrained("out")                       # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(base, "out")     # no SVD at load: the saved tensors are the update

The layers are in the transform form (FURA_SPEC.md §11): the base layer keeps its weight, and
an `nn.Linear`, a bitsandbytes 4-bit/8-bit layer (a QLoRA base) or a GPT-2 `Conv1D` all work.

Registration. PEFT's `register_peft_method` accepts only names in its closed `PeftType` enum,
but PEFT finds a method through three plain dicts keyed by the config's `peft_type`. This is
the one place that writes to them; `tests/test_peft_method.py` fails loudly if a PEFT release
stops reading them.
"""

from __future__ import annotations

from ..optional import require

require("peft", "peft", "fura_kernels.peft (FuRA as a PEFT method)")

from peft import mapping as _mapping  # noqa: E402  (after the one-line install hint)

from .config import PEFT_TYPE, PREFIX, FuRAPeftConfig  # noqa: E402
from .convert import fura_to_peft, peft_to_fura  # noqa: E402
from .layer import FuRALinear  # noqa: E402
from .model import FuRAModel, serve_from_maps  # noqa: E402

_REGISTRY_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def register() -> None:
    """Make PEFT know the `FURA` method (idempotent)."""
    entries = dict(zip(_REGISTRY_TABLES, (FuRAPeftConfig, FuRAModel, PREFIX), strict=True))
    for table_name, value in entries.items():
        table = getattr(_mapping, table_name, None)
        if not isinstance(table, dict):
            import peft

            raise ImportError(
                f"fura_kernels.peft: peft {peft.__version__} has no dict peft.mapping.{table_name}, through which "
                "FuRA registers as a PEFT method; use peft>=0.21 with that table, or report the PEFT version"
            )
        existing = table.get(PEFT_TYPE)
        if existing is not None and existing is not value and existing != value:
            raise RuntimeError(f"fura_kernels.peft: PEFT method {PEFT_TYPE!r} is already registered as {existing!r}")
        table[PEFT_TYPE] = value


register()

__all__ = [
    "PEFT_TYPE",
    "FuRALinear",
    "FuRAModel",
    "FuRAPeftConfig",
    "fura_to_peft",
    "peft_to_fura",
    "register",
    "serve_from_maps",
]
