"""Compiled functions shared by every Trainer that would compile the same program.

A compiled function is built by a factory from the static parts of the components it
runs (an objective, a sampler: their structure and non-array fields) and hashable
settings (optimizer settings, sizes, the mesh); the components' arrays are passed as
its first argument at every call. So two Trainers of equal recipes (a resumed run,
``ddiff eval`` after ``ddiff run``, the tests) share one compiled program, and a
component's array values never become constants of a program another Trainer reuses.
"""

import collections
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax

MAX_CACHED = 32
"""Compiled functions kept in a process (least recently used dropped first)."""

_CACHE: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()


def _static_key(static: Any, arrays: Any) -> Hashable:
    """The structure and non-array leaves of ``static`` with the shapes and dtypes of
    ``arrays``: equal exactly when the traced programs are equal."""
    leaves, treedef = jax.tree.flatten(static)
    shapes = tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(arrays))
    return treedef, tuple(leaves), shapes


class Bound:
    """A compiled function with the arrays of its components bound as first argument."""

    def __init__(self, function: Callable, arrays: Any):
        self.function = function
        self.arrays = arrays

    def __call__(self, *args: Any) -> Any:
        return self.function(self.arrays, *args)

    def lower(self, *args: Any) -> Any:
        """The lowered program for ``args`` (``jax.jit``'s ``lower``), e.g. to inspect its
        memory use."""
        return self.function.lower(self.arrays, *args)


def compiled(
    factory: Callable[..., Callable], components: tuple[Any, ...], **settings: Hashable
) -> Bound:
    """``factory(*static_components, **settings)`` applied to the arrays of
    ``components``, reused from an earlier call with equal static parts and settings.

    The factory returns a function whose first argument is the components' arrays (as
    ``eqx.partition(components, eqx.is_array)`` gives them), to be combined with the
    static components inside; the result here has them bound.
    """
    arrays, static = eqx.partition(components, eqx.is_array)
    key = (factory, _static_key(static, arrays), tuple(sorted(settings.items())))
    try:
        hash(key)
    except TypeError:  # an unhashable field: compile for this caller alone
        return Bound(factory(*static, **settings), arrays)
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = factory(*static, **settings)
        if len(_CACHE) > MAX_CACHED:
            _CACHE.popitem(last=False)
    return Bound(_CACHE[key], arrays)
