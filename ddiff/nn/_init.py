"""A network's initialisation as one compiled program."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ddiff._typing import Key


def compiled_init(parts: Callable[[Key], dict[str, Any]], key: Key) -> dict[str, Any]:
    """``parts(key)`` (a network's parameters by field name) run as one compiled program
    (eagerly, each random initialiser would be compiled on its own), compiled without
    backend optimisation: it runs once, and its many random-number kernels are slow to
    optimise. Inside an outer trace (``eqx.filter_eval_shape``, a jitted constructor) it
    is simply traced."""
    if isinstance(key, jax.core.Tracer):
        return parts(key)
    options = {"xla_backend_optimization_level": 0}
    return eqx.filter_jit(parts, compiler_options=options)(key)
