"""Named array aliases shared by every protocol signature, and the checked-protocol base.

Every module works on one unbatched example; callers vmap. Axis names used throughout:
``seq`` (positions D), ``vocab`` (real token values V), ``states`` (values a noisy token
can take, V+1 for masked processes), ``out`` (network output channels), ``batch``.
"""

import functools
import inspect
import types
from typing import Any

import equinox as eqx
from beartype import BeartypeConf, beartype
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, UInt32, jaxtyped
from jaxtyping import Key as KeyData

from ddiff._config import typecheck_enabled

Tokens = Int[Array, " seq"]
"""One sequence of token ids (clean data, or noisy states including the mask)."""
TokenBatch = Int[Array, "batch seq"]
"""A batch of sequences of token ids (leading batch axis)."""
Time = Float[Array, ""]
"""A scalar diffusion time in [0, 1] (t=0 clean, t=1 fully noised)."""
TimeBatch = Float[Array, " batch"]
"""One diffusion time per example of a batch."""
Label = Int[Array, ""]
"""A class label; ``num_classes`` is the null class used for classifier-free guidance."""
LabelBatch = Int[Array, " batch"]
"""One class label per example of a batch."""
ScheduleValue = Float[Array, " *values"]
"""A schedule quantity: a scalar, or one value per token value (shape ``(V,)``)."""
NetworkOutput = Float[Array, "seq out"]
"""A network's output channels per position of one example."""
LogProbs = Float[Array, "seq vocab"]
"""Log-probabilities over the V real token values, per position."""
LogProbRows = Float[Array, "*rows values"]
"""Rows of log-probabilities over values (the last axis), any leading axes: what a
log-probability transform maps."""
StateProbs = Float[Array, "seq states"]
"""Probabilities (or rates) over every state a noisy token can take, per position."""
StateLogProbs = Float[Array, "seq states"]
"""Log-probabilities (or log-ratios, log-rates) over every state, per position."""
PositionMask = Bool[Array, " seq"]
"""One flag per position of a sequence (e.g. which positions are masked)."""
Key = PRNGKeyArray
"""A JAX PRNG key (a typed key, or the raw uint32 pair of ``jax.random.PRNGKey``)."""
KeyBatch = KeyData[Array, " batch"] | UInt32[Array, "batch 2"]
"""One PRNG key per example of a batch (leading batch axis), e.g. a sampler's per-sample
keys from :func:`ddiff.sample_keys`."""
Calls = int | Int[Array, ""]
"""Network calls a sampler step made: a Python int, or an int32 scalar where it depends on
the state (a call skipped under ``lax.cond``)."""
Scalar = Float[Array, ""]
"""A scalar float (a loss, a term in nats)."""

_BEARTYPE = beartype(conf=BeartypeConf(is_pep484_tower=True))


def _with_annotations(fn: Any, annotations: dict[str, Any]) -> Any:
    """A copy of ``fn`` carrying ``annotations``; ``fn`` keeps the ones written at it."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    copy.__annotations__ = annotations
    return copy


def _check(fn: Any, annotations: dict[str, Any] | None = None) -> Any:
    checked = jaxtyped(typechecker=_BEARTYPE)(fn if annotations is None else _with_annotations(fn, annotations))

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
    shape. The override keeps the annotations written at it (what readers, ``inspect``
    and pyright see); the built-in plugins write the protocol's at every override.
    :func:`ddiff.set_typecheck` turns the checks off.
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
            fn.__ddiff_contract__ = contract
            setattr(cls, name, _check(fn, {**fn.__annotations__, **merged}))
