"""Log-probability transforms: changes of the model's prediction mu before a sampler draws
from it (the nucleus, a temperature), composed with :func:`chain` in the spirit of optax."""

import abc
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from ddiff._capabilities import Capable
from ddiff._errors import RecipeError
from ddiff._typing import AbstractCheckedModule, LogProbRows


class AbstractLogProbTransform(AbstractCheckedModule, Capable):
    """A change of the distribution a sampler draws from, row by row: every row of
    log-probabilities (the last axis, e.g. log mu[n, :] at a position n) is mapped to
    another row of log-probabilities, independently of the other rows. A sampler that
    draws from mu applies it to every prediction (:meth:`ddiff.Prediction.log_mean`,
    guidance included), so it changes what is drawn and nothing else. Registered in the
    ``transform`` slot; a recipe lists them under a sampler's ``transforms`` key, applied
    in order (:func:`chain`)."""

    @abc.abstractmethod
    def __call__(self, log_probs: LogProbRows) -> LogProbRows:
        """The transformed rows (normalised), same shape.

        Arguments:
            log_probs: normalised log-probabilities, the values on the last axis. A row that
                is one-hot (a token carried over) must stay one-hot.
        """

    def as_top_p(self) -> float | None:
        """The nucleus mass that states this transform in a :class:`ddiff.ReverseChain`
        (1 for none), or None (the default) when a chain cannot state it: the conformance
        kit then checks the sampler against the data only."""
        return None


class Chain(AbstractLogProbTransform):
    """Several transforms applied in order (the first to the model's rows); none is the
    identity. Build it with :func:`chain`.

    Attributes:
        transforms: the transforms, first applied first.
    """

    transforms: tuple[AbstractLogProbTransform, ...] = ()

    def __call__(self, log_probs):
        for transform in self.transforms:
            log_probs = transform(log_probs)
        return log_probs

    def as_top_p(self):
        if not self.transforms:
            return 1.0
        if len(self.transforms) == 1:
            return self.transforms[0].as_top_p()
        return None


def chain(*transforms: AbstractLogProbTransform) -> AbstractLogProbTransform:
    """The transforms applied in order, as one transform; ``chain()`` is the identity."""
    return Chain(transforms=tuple(transforms))


class TopP(AbstractLogProbTransform):
    """The nucleus of each row (Holtzman et al. 2020; MD4's ``topp`` sampler): the most
    probable values whose mass reaches ``top_p`` are kept and renormalised, the others get
    probability 0. ``top_p = 1`` keeps every value. Sorted by probability, a value is kept

    - ``crossing: keep`` (default; the smallest set whose mass reaches ``top_p``, as in
      Holtzman et al.): when the mass of the values more probable than it is below
      ``top_p``, so the value whose cumulative mass crosses ``top_p`` is kept;
    - ``crossing: drop`` (BD3-LM's ``_nucleus_sample``): when the cumulative mass up to
      and including it is at most ``top_p``, so the crossing value is dropped; the most
      probable value is always kept.

    Attributes:
        top_p: the nucleus mass, in (0, 1].
        crossing: ``keep`` or ``drop``: the value whose cumulative mass crosses ``top_p``.
    """

    top_p: float = eqx.field(static=True, default=0.98)
    crossing: Literal["keep", "drop"] = eqx.field(static=True, default="keep")

    def __check_init__(self):
        if not 0.0 < self.top_p <= 1.0:
            raise RecipeError(f"top_p must be in (0, 1], got {self.top_p}", path="top_p")

    def __call__(self, log_probs):
        order = jnp.argsort(-log_probs, axis=-1)
        sorted_probs = jnp.take_along_axis(jnp.exp(log_probs), order, axis=-1)
        if self.crossing == "keep":
            keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < self.top_p
        else:
            first = jnp.arange(sorted_probs.shape[-1]) == 0
            keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) <= self.top_p) | first | (self.top_p >= 1.0)
        keep = (
            jnp.zeros_like(keep_sorted).at[(*jnp.indices(order.shape)[:-1], order)].set(keep_sorted)
        )
        return jax.nn.log_softmax(jnp.where(keep, log_probs, -jnp.inf), axis=-1)

    def as_top_p(self):
        """The nucleus mass under ``crossing: keep`` (the kit's convention); None under
        ``drop``, which a :class:`ddiff.ReverseChain` does not state."""
        return self.top_p if self.crossing == "keep" else None
