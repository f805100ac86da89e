"""The Objective protocol: a loss estimate for one example, vmapped over a batch."""

import abc
import dataclasses
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int

from ddiff._capabilities import CONTINUOUS_TIME, DISCRETE_TIME, Capable
from ddiff._errors import check_at_least
from ddiff._model import DiffusionModel
from ddiff._typing import (
    AbstractCheckedModule,
    Key,
    Label,
    LabelBatch,
    Scalar,
    Time,
    TimeBatch,
    TokenBatch,
    Tokens,
)


class ObjectiveTerms(eqx.Module):
    """What an objective returns for one example (or the batch mean of these).

    Attributes:
        loss: the quantity that is differentiated (a surrogate where the objective
            needs one, e.g. REINFORCE or a hybrid cross-entropy), in nats.
        nelbo: an unbiased estimate of the negative ELBO of the whole sequence, in nats.
        metrics: named terms (``diffusion``, ``reconstruction``, ``prior``, ...), in nats,
            and diagnostics that are not nats where an objective has them (GenMD4's
            learned powers ``power_min``/``power_mean``/``power_max``, dimensionless).
    """

    loss: Scalar
    nelbo: Scalar
    metrics: dict[str, Scalar]


def bound_terms(model: DiffusionModel, x0: Tokens, diffusion: Scalar) -> ObjectiveTerms:
    """The terms of a diffusion bound on -log p(x_0): the diffusion term (an estimate, in
    nats) plus the process's reconstruction term at t = 0
    (:meth:`~ddiff.AbstractForwardProcess.reconstruction_nll`) and its exact prior term
    (:meth:`~ddiff.AbstractForwardProcess.prior_kl`); the loss is the bound itself."""
    process = model.process
    reconstruction = process.reconstruction_nll(x0)
    prior = process.prior_kl(x0)
    nelbo = diffusion + reconstruction + prior
    return ObjectiveTerms(
        loss=nelbo,
        nelbo=nelbo,
        metrics={"diffusion": diffusion, "reconstruction": reconstruction, "prior": prior},
    )


@dataclasses.dataclass(frozen=True)
class BoundForm:
    """Which bound an objective's ``nelbo`` estimates, stated in terms that
    :mod:`ddiff.testing` computes exactly on a toy (it never reads the objective's code):

        nelbo = prior + diffusion + reconstruction,

    with prior = KL(q(x_1 | x_0) || p(x_1)) summed over positions, and

    - continuous time (``steps`` None): diffusion = int_{t_start}^1 E_{x_t ~ q_t(. | x_0)}
      [KL rate between the reverse chain given x_0 and the model's] dt (Campbell et al.
      2022; Lou et al. 2024), reconstruction at t_start;
    - discrete time (``steps`` = T, grid t_i = i/T): diffusion = sum over steps i of
      E_{x_{t_i}} KL(q(x_{t_{i-1}} | x_{t_i}, x_0) || p_theta(x_{t_{i-1}} | x_{t_i})), the
      model's step averaging the true posterior over x_0 ~ mu_theta(x_{t_i}, t_i) (MD4
      eq. 4, D3PM eq. 1); i = 1..T with the ``data_free`` decoder at t = 0, i = 2..T with
      the ``model`` decoder, whose i = 1 term is the reconstruction.

    The reconstruction is E[-log d(x_0 | z)] for z the noisy sequence at t_start (continuous)
    or at t_1 = 1/T (discrete, ``model``) or t = 0 (discrete, ``data_free``), with decoder
    ``data_free``: d(v | z^n) proportional to q(z^n | v) per position (the process's
    :meth:`~ddiff.AbstractForwardProcess.reconstruction_nll`, :func:`bound_terms`), or
    ``model``: d = mu_theta(z, time) (Campbell et al.'s decoder, D3PM's first step).

    Attributes:
        steps: None for a continuous-time bound, else the number of steps T.
        t_start: where a continuous-time integral starts (GenMD4's t1).
        decoder: ``data_free`` or ``model``.
    """

    steps: int | None = None
    t_start: float = 0.0
    decoder: Literal["data_free", "model"] = "data_free"


class AbstractObjective(AbstractCheckedModule, Capable):
    """A training objective. ``requires`` names the capabilities it needs (e.g. a mean
    parameterization and a masked process); a recipe that cannot provide them is refused
    at load time.
    """

    def bound_form(self) -> BoundForm | None:
        """Which bound ``nelbo`` estimates, for the conformance kit (``ddiff.testing``
        checks every reported term against it exactly). The default: for an objective
        with capability ``continuous_time``, the integral over [0, 1] with the data-free
        decoder (what :func:`bound_terms` assembles); None otherwise (the kit then checks
        only the oracle properties). :class:`AbstractDiscreteTimeObjective` declares the
        ``steps``-step bound."""
        if CONTINUOUS_TIME in self.capabilities():
            return BoundForm()
        return None

    def sample_times(self, key: Key, batch_size: int) -> TimeBatch:
        """Antithetic times t_i = (u + i/B) mod 1 (MD4, sec. 4), one per example."""
        u = jax.random.uniform(key, ())
        return jnp.mod(u + jnp.arange(batch_size) / batch_size, 1.0)

    @abc.abstractmethod
    def example_terms(
        self,
        model: DiffusionModel,
        x0: Tokens,
        t: Time,
        *,
        key: Key,
        label: Label | None = None,
        train: bool = True,
    ) -> ObjectiveTerms:
        """The objective for one clean sequence at time t.

        Arguments:
            model: the model being trained.
            x0: clean tokens, shape (seq,).
            t: a time drawn by :meth:`sample_times`.
            key: randomness for the forward process (and dropout when ``train``).
            label: class label, or None.
            train: whether the network runs in training mode (dropout).
        """

    def per_example_terms(
        self,
        model: DiffusionModel,
        x0: TokenBatch,
        *,
        key: Key,
        labels: LabelBatch | None = None,
        train: bool = True,
        offset: Int[Array, ""] | int = 0,
        total: int | None = None,
    ) -> ObjectiveTerms:
        """:meth:`example_terms` for every example of a batch (leading batch axis).

        The batch may be the slice ``offset .. offset + len(x0)`` of a global batch of
        ``total`` examples (one device's share). Times are the matching slice of
        :meth:`sample_times` for the global batch, and the noise of global example i is
        keyed by folding i into ``key``, so no draw depends on how the batch is split.
        """
        local = x0.shape[0]
        total = local if total is None else total
        time_key, noise_key = jax.random.split(key)
        times = jax.lax.dynamic_slice_in_dim(self.sample_times(time_key, total), offset, local)
        indices = offset + jnp.arange(local)
        keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(indices)

        def one(x, t, k, label):
            return self.example_terms(model, x, t, key=k, label=label, train=train)

        return jax.vmap(one)(x0, times, keys, labels)

    def batch_terms(
        self,
        model: DiffusionModel,
        x0: TokenBatch,
        *,
        key: Key,
        labels: LabelBatch | None = None,
        train: bool = True,
    ) -> ObjectiveTerms:
        """Batch mean of :meth:`per_example_terms`."""
        terms = self.per_example_terms(model, x0, key=key, labels=labels, train=train)
        return jax.tree.map(lambda a: jnp.mean(a, axis=0), terms)


class AbstractDiscreteTimeObjective(AbstractObjective):
    """An objective that bounds -log p(x_0) under a T-step discrete-time model (capability
    ``discrete_time``), the step T being its constructor argument ``steps`` (>= 1).

    Step i runs from s = (i-1)/T to t = i/T. :meth:`sample_times` draws the step index
    antithetically across the batch, i = floor(T u_b) + 1 with u_b = (u + b/B) mod 1
    (MD4 sec. 4), and gives t = i/T; ``example_terms`` returns T times the term of step i,
    an unbiased estimate of the sum over the steps.

    Attributes:
        steps: the number of steps T.
    """

    provides = frozenset({DISCRETE_TIME})
    steps: AbstractVar[int]

    def __check_init__(self):
        check_at_least("steps", self.steps)

    def bound_form(self) -> BoundForm | None:
        """The bound of the ``steps``-step model with the data-free decoder at t = 0."""
        return BoundForm(steps=self.steps)

    def sample_times(self, key: Key, batch_size: int) -> TimeBatch:
        """Grid times t_b = i_b / T, the step indices i_b antithetic across the batch."""
        u = jax.random.uniform(key, ())
        fraction = jnp.mod(u + jnp.arange(batch_size) / batch_size, 1.0)
        index = jnp.minimum(jnp.floor(fraction * self.steps), self.steps - 1) + 1.0
        return index / self.steps
