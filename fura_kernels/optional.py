"""Optional dependencies: import them, or say in one line which extra installs them."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, or raise an ImportError naming who needed it and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs {module}: pip install 'fura-kernels[{extra}]'") from err


def check_installed(modules: tuple[str, ...], extra: str, what: str) -> None:
    """Exit with a one-line install hint if any of `modules` is missing (for command-line tools,
    checked before any work starts)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"{what} needs {', '.join(missing)}: pip install 'fura-kernels[{extra}]'")
