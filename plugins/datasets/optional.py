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


def hugging_face_dataset(
    name: str, *arguments: Any, purpose: str, prefix: str, advice: str, **options: Any
) -> Any:
    """``datasets.load_dataset(name, *arguments, **options)`` (from the extra ``text``,
    needed for ``purpose``), or one line: ``prefix``, why the data set could not be
    loaded, then ``advice``."""
    datasets = optional_import("datasets", "text", purpose)
    try:
        return datasets.load_dataset(name, *arguments, **options)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean "not available"
        raise ddiff.DataError(
            f"{prefix} the Hugging Face data set {name} could not be loaded "
            f"({type(error).__name__}: {error}); {advice}"
        ) from None
