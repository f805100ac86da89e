"""Process-wide switches."""

import contextlib
import os
from collections.abc import Iterator

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in _TRUE


_state = {"typecheck": _env_flag("DDIFF_TYPECHECK", True)}


def typecheck_enabled() -> bool:
    """Whether protocol calls are shape- and dtype-checked when they are traced."""
    return _state["typecheck"]


def set_typecheck(enabled: bool) -> None:
    """Turn the trace-time jaxtyping/beartype checks of protocol calls on or off.

    The default comes from the environment variable ``DDIFF_TYPECHECK`` (on unless
    it is ``0``/``false``). The checks run while JAX traces a function, so they cost
    nothing in a compiled step.
    """
    _state["typecheck"] = bool(enabled)


@contextlib.contextmanager
def typecheck(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_typecheck`."""
    previous = _state["typecheck"]
    _state["typecheck"] = bool(enabled)
    try:
        yield
    finally:
        _state["typecheck"] = previous
