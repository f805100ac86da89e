"""Named array aliases shared by every protocol signature, and the checked-protocol base.

Every module works on one unbatched example; callers vmap. Axis names used throughout:
``seq`` (positions D), ``vocab`` (real token values V), ``states`` (values a noisy token
can take, V+1 for masked processes), ``out`` (network output channels), ``batch``.
"""

import functools
import inspect
from typing import Any

import equinox as eqx
from beartype import BeartypeConf, beartype
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, jaxtyped

from ddiff._config import typecheck_enabled

Tokens = Int[Array, " seq"]
"""One sequence of token ids (clean data, or noisy states including the mask)."""
TokenBatch = Int[Array, "batch seq"]
Time = Float[Array, ""]
"""A scalar diffusion time in [0, 1] (t=0 clean, t=1 fully noised)."""
Times = Float[Array, " batch"]
Label = Int[Array, ""]
"""A class label; ``num_classes`` is the null class used for classifier-free guidance."""
Labels = Int[Array, " batch"]
ScheduleValue = Float[Array, " *values"]
"""A schedule quantity: a scalar, or one value per token value (shape ``(V,)``)."""
NetworkOutput = Float[Array, "seq out"]
LogProbs = Float[Array, "seq vocab"]
"""Log-probabilities over the V real token values, per position."""
StateProbs = Float[Array, "seq states"]
"""Probabilities (or rates) over every state a noisy token can take, per position."""
StateLogProbs = Float[Array, "seq states"]
PositionMask = Bool[Array, " seq"]
Key = PRNGKeyArray
Scalar = Float[Array, ""]

_BEARTYPE = beartype(conf=BeartypeConf(is_pep484_tower=True))


def _check(fn: Any) -> Any:
    checked = jaxtyped(typechecker=_BEARTYPE)(fn)

    @functools.wraps(fn)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if typecheck_enabled():
            return checked(*args, **kwargs)
        return fn(*args, **kwargs)

    dispatch.__ddiff_contract__ = getattr(fn, "__ddiff_contract__", fn.__annotations__)
    return dispatch


def _contract(cls: type, name: str) -> dict[str, Any] | None:
    for base in cls.__mro__[1:]:
        method = base.__dict__.get(name)
        if method is None:
            continue
        contract = getattr(method, "__ddiff_contract__", None)
        if contract is None and base.__name__.startswith("Abstract") and inspect.isfunction(method):
            contract = method.__annotations__
        return contract or None
    return None


class AbstractCheckedModule(eqx.Module):
    """Base of the protocols: calls are shape- and dtype-checked when traced.

    Each method annotated in an ``Abstract*`` protocol class is a contract. An override
    in a subclass is checked against the protocol's annotations (jaxtyping with beartype,
    ``is_pep484_tower=True``) whether or not it repeats them, so a plugin that returns
    the wrong shape fails at the first traced call, naming the argument and the expected
    shape. :func:`ddiff.set_typecheck` turns the checks off.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        is_protocol = cls.__name__.startswith("Abstract")
        for name, fn in list(cls.__dict__.items()):
            if not inspect.isfunction(fn) or getattr(fn, "__isabstractmethod__", False):
                continue
            if name.startswith("__") and name != "__call__":
                continue
            contract = _contract(cls, name)
            if contract is None and is_protocol and fn.__annotations__:
                contract = fn.__annotations__
            if not contract:
                continue
            params = inspect.signature(fn).parameters
            merged = {k: v for k, v in contract.items() if k in params or k == "return"}
            fn.__annotations__ = {**fn.__annotations__, **merged}
            fn.__ddiff_contract__ = contract
            setattr(cls, name, _check(fn))
