"""Optional dependencies, imported when a data set first needs them."""

import importlib
from typing import Any

import ddiff


def optional_import(module: str, extra: str, purpose: str) -> Any:
    """Import an optional dependency, or fail with one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ddiff.DdiffError(
            f"{purpose} needs the Python package {module!r}: pip install 'ddiff[{extra}]'"
        ) from None
