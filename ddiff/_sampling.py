"""The sampling driver: samplers written as a step rule over one loop, as Diffrax separates
a solver's ``step`` from ``diffeqsolve``.

A step sampler says how to take one step (and how to start and finish); :func:`run_sampler`
owns everything around it: where the reverse process starts, the keys, the loop (a
``lax.scan`` over a time grid or a ``lax.while_loop`` until done), the given positions
(infilling), the count of network calls, and the model's predictions bound to the labels,
guidance, block prefix and the sampler's log-probability transforms (:class:`Prediction`).
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ddiff._capabilities import MASKED
from ddiff._categorical import categorical
from ddiff._errors import check_at_least
from ddiff._model import DiffusionModel
from ddiff._sampler import (
    AbstractSampler,
    Conditioning,
    SampleOutput,
    TimeGrid,
    apply_fixed,
    batched_log_mean,
    batched_log_score,
    calls_per_prediction,
    start_sampling,
    step_keys,
    still_masked,
    time_grid,
)
from ddiff._sampling_transforms import AbstractLogProbTransform, chain
from ddiff._typing import Calls, KeyBatch, Time, TokenBatch


class Prediction(eqx.Module):
    """The model as a step sampler reads it in one sampling run: its predictions for a
    batch, bound to the run's conditioning (labels, classifier-free guidance, the clean
    blocks of block diffusion) and to the sampler's log-probability transform, each with the network calls
    it took. :func:`run_sampler` builds it and passes it to every hook.

    Attributes:
        model: the model (its process, schedule and network for what a step computes).
        conditioning: the run's conditioning.
        transform: what :meth:`log_mean` applies to mu (the sampler's
            :attr:`~AbstractStepSampler.transforms`, chained).
    """

    model: DiffusionModel
    conditioning: Conditioning
    transform: AbstractLogProbTransform

    @property
    def calls(self) -> int:
        """Network calls one prediction takes: 2 under classifier-free guidance, else 1."""
        return calls_per_prediction(self.conditioning)

    def log_mean(
        self, tokens: TokenBatch, t: Float[Array, ""] | Float[Array, " batch"]
    ) -> tuple[Float[Array, "batch seq vocab"], int]:
        """The transformed log mu_theta(x_0 | x_t) of every sample (:func:`batched_log_mean`,
        guidance included), at one time or one per sample, and the calls it took."""
        log_mean, calls = batched_log_mean(self.model, tokens, t, self.conditioning)
        return self.transform(log_mean), calls

    def log_score(
        self, tokens: TokenBatch, t: Float[Array, ""] | Float[Array, " batch"]
    ) -> tuple[Float[Array, "batch seq states"], int]:
        """log s_theta(x_t, t) of every sample (:func:`batched_log_score`, guidance
        included; scores are not transformed), and the calls it took."""
        return batched_log_score(self.model, tokens, t, self.conditioning)

    def finish_masked(
        self,
        tokens: TokenBatch,
        *,
        keys: KeyBatch,
        predict: Callable[[TokenBatch], tuple[jax.Array, Calls]] | None = None,
    ) -> SampleOutput:
        """The positions still masked (and not given) drawn from the transformed mu(x, 0)
        with ``keys``, the given positions set; the network is called only when such a
        position exists. The default end of a grid sampler on a masked process.

        Arguments:
            tokens: x after the last step.
            keys: one key per sample.
            predict: x -> (log mu(x, 0), calls) where the sampler has its own (a cache);
                default :meth:`log_mean` at t = 0.
        """
        mask_id = self.model.process.mask_id

        def decode(x):
            log_mean, calls = self.log_mean(x, jnp.zeros(())) if predict is None else predict(x)
            drawn = jax.vmap(categorical)(keys, log_mean)
            return apply_fixed(self.conditioning, jnp.where(x == mask_id, drawn, x)), jnp.int32(
                calls
            )

        tokens, calls = jax.lax.cond(
            jnp.any(still_masked(self.conditioning, tokens, mask_id)),
            decode,
            lambda x: (x, jnp.int32(0)),
            tokens,
        )
        return SampleOutput(tokens=tokens, num_function_evals=calls)


class AbstractStepSampler(AbstractSampler):
    """A sampler written as a rule for one step, which :func:`run_sampler` runs: the
    reverse process starts at x_1 (:func:`ddiff.start_sampling`: all-mask on a masked
    process, otherwise the prior; given positions set), :meth:`init` makes the sampler's
    own carry, the driver's loop takes steps (:class:`AbstractGridSampler`: one per pair of
    grid times, in a ``lax.scan``; :class:`AbstractLoopSampler`: until done, in a
    ``lax.while_loop``), sets the given positions after every step and adds up the
    network calls each step reports, and ``finish`` ends it. Sample i draws step k's
    randomness from ``fold_in(loop_keys[i], k)`` and the finish's from ``final_keys[i]``
    (:class:`ddiff.SamplingStart`), so a sample never depends on its batch.

    Its ``sample`` is :func:`run_sampler`; concrete samplers write the step rule (and,
    where they need them, the carry, the finish and the transforms).
    """

    transforms = ()
    """The log-probability transforms :meth:`Prediction.log_mean` applies to mu, in order,
    before the sampler draws from it (default: none). A sampler that draws from mu declares
    it as a recipe key, ``transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()``,
    or as a property derived from its own keys (``top_p``)."""

    def init(self, prediction: Prediction, tokens: TokenBatch, *, keys: KeyBatch) -> Any:
        """The sampler's carry beyond the tokens (caches, per-sample times, ...) at the
        start; the default is None.

        Arguments:
            prediction: the run's model, conditioning and transform.
            tokens: x_1, shape (batch, seq).
            keys: the caller's per-sample keys (a sampler that runs another sampler per
                block may fold its block index into them).
        """
        return None

    def sample(self, model, *, keys, seq_len, conditioning):
        return run_sampler(self, model, keys=keys, seq_len=seq_len, conditioning=conditioning)


class AbstractGridSampler(AbstractStepSampler):
    """A step sampler on a time grid 1 = t_0 > t_1 > ... > t_T = 0 (:meth:`times`, by
    default :func:`ddiff.time_grid` of ``grid`` and ``steps``): one :meth:`step` from t_k
    to t_{k+1} for k = 0..T-1, jitted as one ``lax.scan``, then :meth:`finish`. The
    fields are the grid's recipe keys, declared here once for every grid sampler.

    Attributes:
        steps: T, the number of steps (>= 1).
        grid: ``uniform`` or ``cosine`` (:data:`ddiff.TimeGrid`).
    """

    steps: int = eqx.field(static=True, default=128)
    grid: TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        check_at_least("steps", self.steps)

    def times(self) -> Float[Array, " times"]:
        """The grid t_0 = 1 > ... > t_T (default ``time_grid(grid, steps)``); the same array
        states the chain's times (:class:`ddiff.ReverseChain` takes it)."""
        return time_grid(self.grid, self.steps)

    @abc.abstractmethod
    def step(
        self,
        prediction: Prediction,
        tokens: TokenBatch,
        carry: Any,
        t: Time,
        s: Time,
        *,
        keys: KeyBatch,
    ) -> tuple[TokenBatch, Any, Calls]:
        """One reverse step of the batch from time t to s < t.

        Arguments:
            prediction: the run's model predictions (:class:`Prediction`).
            tokens: x_t, shape (batch, seq), given positions set.
            carry: the sampler's carry (:meth:`init`).
            t, s: the step's times.
            keys: one key per sample for this step.

        Returns:
            x_s (the driver sets the given positions again), the carry, and the network
            calls made.
        """

    def finish(
        self, prediction: Prediction, tokens: TokenBatch, carry: Any, *, keys: KeyBatch
    ) -> SampleOutput:
        """The output after the last step, and the network calls it took. Default: on a
        masked process the positions still masked drawn from mu(x, 0)
        (:meth:`Prediction.finish_masked`); on any other, x as it is."""
        if MASKED in prediction.model.process.capabilities():
            return prediction.finish_masked(tokens, keys=keys)
        return SampleOutput(tokens=tokens, num_function_evals=jnp.int32(0))


class AbstractLoopSampler(AbstractStepSampler):
    """A step sampler without a time grid: steps k = 0, 1, ... while not :meth:`done`, in
    one ``lax.while_loop`` (first-hitting sampling draws its own times, a decoder stops
    when nothing is masked, a block sampler at an end token), then :meth:`finish`."""

    @abc.abstractmethod
    def done(
        self, prediction: Prediction, tokens: TokenBatch, carry: Any, index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        """Whether the loop stops before step ``index`` (the whole batch: a sample that is
        done must come through further steps unchanged)."""

    @abc.abstractmethod
    def step(
        self,
        prediction: Prediction,
        tokens: TokenBatch,
        carry: Any,
        index: Int[Array, ""],
        *,
        keys: KeyBatch,
    ) -> tuple[TokenBatch, Any, Calls]:
        """Step ``index`` of the batch.

        Arguments:
            prediction: the run's model predictions (:class:`Prediction`).
            tokens: the current tokens, shape (batch, seq), given positions set.
            carry: the sampler's carry (:meth:`init`).
            index: the step's index k.
            keys: one key per sample for this step.

        Returns:
            The new tokens (the driver sets the given positions again), the carry, and the
            network calls made.
        """

    def finish(
        self, prediction: Prediction, tokens: TokenBatch, carry: Any, *, keys: KeyBatch
    ) -> SampleOutput:
        """The output after the last step, and the network calls it took (default: the
        tokens as they are, no call)."""
        return SampleOutput(tokens=tokens, num_function_evals=jnp.int32(0))


def run_sampler(
    sampler: AbstractGridSampler | AbstractLoopSampler,
    model: DiffusionModel,
    *,
    keys: KeyBatch,
    seq_len: int,
    conditioning: Conditioning,
) -> SampleOutput:
    """Run a step sampler: the driver every built-in sampler goes through (it is their
    ``sample``). Starts at x_1 with :func:`ddiff.start_sampling`, binds the model to
    ``conditioning`` and the sampler's transforms (:class:`Prediction`), takes the steps
    (a ``lax.scan`` over the grid of an :class:`AbstractGridSampler`, a ``lax.while_loop``
    until an :class:`AbstractLoopSampler` is done) with step k's keys
    ``fold_in(loop_keys[i], k)``, sets the given positions after every step, then
    finishes with the final keys. The network calls are the steps' and the finish's.

    Arguments:
        sampler: the step sampler.
        model: the (EMA) model.
        keys: one PRNG key per sample (:func:`ddiff.sample_keys`).
        seq_len: positions per sequence.
        conditioning: labels, given positions, guidance, prefix (batch axis as ``keys``).
    """
    start = start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
    transform = chain(*sampler.transforms)
    prediction = Prediction(model=model, conditioning=conditioning, transform=transform)
    carry = sampler.init(prediction, start.tokens, keys=keys)
    calls = jnp.int32(0)
    if isinstance(sampler, AbstractGridSampler):
        times = sampler.times()

        def grid_step(state, inputs):
            tokens, carry, calls = state
            t, s, index = inputs
            tokens, carry, used = sampler.step(
                prediction, tokens, carry, t, s, keys=step_keys(start.loop_keys, index)
            )
            return (apply_fixed(conditioning, tokens), carry, calls + used), None

        steps = jnp.arange(times.shape[0] - 1)
        (tokens, carry, calls), _ = jax.lax.scan(
            grid_step, (start.tokens, carry, calls), (times[:-1], times[1:], steps)
        )
    else:

        def loop_step(state):
            tokens, carry, calls, index = state
            tokens, carry, used = sampler.step(
                prediction, tokens, carry, index, keys=step_keys(start.loop_keys, index)
            )
            return apply_fixed(conditioning, tokens), carry, calls + used, index + 1

        tokens, carry, calls, _ = jax.lax.while_loop(
            lambda state: ~sampler.done(prediction, state[0], state[1], state[3]),
            loop_step,
            (start.tokens, carry, calls, jnp.int32(0)),
        )
    output = sampler.finish(prediction, tokens, carry, keys=start.final_keys)
    return SampleOutput(
        tokens=output.tokens,
        num_function_evals=calls + output.num_function_evals,
        lengths=output.lengths,
    )
