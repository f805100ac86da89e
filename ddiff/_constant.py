"""Constants: arrays a component holds but nobody trains (precomputed tables)."""

from typing import Any

import equinox as eqx
from jaxtyping import Array


class Constant(eqx.Module):
    """A non-trainable array held by a component, e.g. D3PM's precomputed transition
    matrices. The trainer leaves it out of gradients, the optimizer (and its weight
    decay), the EMA and checkpoints (it is rebuilt from the recipe), and replicates it on
    every device of the mesh. Read it as ``constant.value``.
    """

    value: Array


def is_constant(node: Any) -> bool:
    """Whether ``node`` is a :class:`Constant` (pass as ``is_leaf`` to tree functions)."""
    return isinstance(node, Constant)


def is_parameter(leaf: Any) -> bool:
    """A trainable leaf: a floating-point array that is not a :class:`Constant`."""
    return not isinstance(leaf, Constant) and eqx.is_inexact_array(leaf)


def is_saved(leaf: Any) -> bool:
    """A leaf a checkpoint holds: any array that is not a :class:`Constant`."""
    return not isinstance(leaf, Constant) and eqx.is_array(leaf)


def trainable(tree: Any) -> Any:
    """The trainable leaves of ``tree`` (``None`` elsewhere), as ``eqx.filter`` returns."""
    return eqx.filter(tree, is_parameter, is_leaf=is_constant)


def partition_trainable(tree: Any) -> tuple[Any, Any]:
    """``(parameters, rest)`` as ``eqx.partition`` returns; ``eqx.combine`` undoes it."""
    return eqx.partition(tree, is_parameter, is_leaf=is_constant)
