"""Path planning P2 (Peng et al. 2025)."""

import abc
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

import ddiff
from ddiff_plugins.decoding._selection import (
    AbstractCountDecoder,
    CountSchedule,
    highest,
    predict_where_typical,
    still_to_decode,
)


class AbstractPathPlanningSampler(AbstractCountDecoder):
    """Path planning (P2, Peng et al. 2025, arXiv 2502.03540, their Alg. 1): from
    all-mask, step i = 1..T evaluates mu_theta once, draws a proposal for every masked
    position from it, and asks the planner (:meth:`planner_scores`) to score every
    position to decode, masked or decoded; the floor(M g(i/T)) lowest-scoring positions
    (M to decode, g the :data:`CountSchedule`, P2's 1 - kappa) are masked (decoded tokens
    among them are remasked), the other masked positions take their proposals. A
    time-conditioned network is evaluated at the time whose alpha_t is the fraction of
    unmasked positions (:func:`network_times`); the loop is the driver's
    (:class:`AbstractCountDecoder`). Network evaluations: T (doubled under guidance),
    plus what the planner spends.

    The planner is the hook: a subclass implements :meth:`planner_scores` (a second
    network's view, a trained planner, ...).
    """

    @abc.abstractmethod
    def planner_scores(
        self, model: ddiff.DiffusionModel, x: ddiff.TokenBatch, proposal: ddiff.TokenBatch,
        log_mean: jax.Array, recorded: jax.Array, masked: jax.Array,
        conditioning: ddiff.Conditioning, *, keys: ddiff.KeyBatch
    ) -> tuple[jax.Array, jax.Array]:
        """How much each position should hold its token, shape (batch, seq): the lowest
        scores are masked next. Only positions to decode are compared.

        Arguments:
            model: the model.
            x: the current tokens (mask at masked positions).
            proposal: x with a draw from mu_theta at every masked position.
            log_mean: log mu_theta(x), shape (batch, seq, vocab).
            recorded: log mu of each decoded token when it was decoded (0 elsewhere).
            masked: which positions to decode are masked.
            conditioning: the sampling's conditioning.
            keys: one key per sample for the planner's own randomness.

        Returns:
            The scores, and the network evaluations the planner made (an int32 scalar).
        """

    def init(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, *, keys: ddiff.KeyBatch
    ) -> Any:
        """The log-probability each decoded token had when it was decoded (0 while
        masked), and which positions are to decode."""
        return jnp.zeros(tokens.shape, jnp.float32), still_to_decode(prediction, tokens)

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        recorded, to_decode = carry
        model, conditioning = prediction.model, prediction.conditioning
        mask_id = model.process.mask_id
        masked = still_to_decode(prediction, tokens)
        log_mean, calls = predict_where_typical(prediction, tokens)
        split = jax.vmap(lambda key: jax.random.split(key, 3))(keys)
        drawn = jax.vmap(ddiff.categorical)(split[:, 0], log_mean)
        proposal = jnp.where(masked, drawn, tokens)
        scores, used = self.planner_scores(
            model, tokens, proposal, log_mean, recorded, masked, conditioning, keys=split[:, 1]
        )
        left = self.masked_after(jnp.sum(to_decode, axis=-1), index)
        lowest = jax.vmap(highest)(split[:, 2], jnp.where(to_decode, -scores, -jnp.inf), left)
        remask = lowest & to_decode
        revealed = masked & ~remask
        picked = jnp.take_along_axis(log_mean, proposal[..., None], axis=-1)[..., 0]
        tokens = jnp.where(remask, mask_id, jnp.where(revealed, proposal, tokens))
        recorded = jnp.where(revealed, picked, jnp.where(remask, 0.0, recorded))
        return tokens, (recorded, to_decode), calls + used


class PathPlanningSampler(AbstractPathPlanningSampler):
    """P2 with self-planning (Peng et al. 2025, sec. 4): the denoiser scores the positions
    (see :class:`AbstractPathPlanningSampler` for the loop). With ``score: log_prob`` a
    masked position scores the log-probability mu_theta gives its proposal, and a decoded
    one ``eta`` times the log-probability its token had when it was decoded: a mean
    parameterization carries a visible token over with probability 1, so it cannot rescore
    it in context (P2's code rescores with a BERT-style denoiser; ReMDM's confidence
    schedule records the same number). Scores are <= 0, so eta = 0 never remasks and a
    larger eta (P2's stochasticity strength) remasks more. With ``score: random`` every
    position scores log U, U uniform, decoded ones eta log U (P2's random planner; with
    eta = 0 it is ancestral sampling in a random order, P2's own special case).

    Distribution: a heuristic that is not the model's distribution (positions are chosen
    by the probability of what was drawn there, and decoded tokens are revised), except
    for ``score: random`` with ``eta: 0`` and one position per step (T >= M with the
    linear schedule): that is exact for an exact denoiser (the conformance kit checks it).

    Attributes:
        steps: planning steps T.
        schedule: ``linear`` (P2's kappa(t) = t) or ``cosine``.
        eta: the stochasticity strength (>= 0).
        score: ``log_prob`` (self-planning) or ``random``.
    """

    schedule: CountSchedule = eqx.field(static=True, default="linear")
    eta: float = eqx.field(static=True, default=1.0)
    score: Literal["log_prob", "random"] = eqx.field(static=True, default="log_prob")

    def __check_init__(self):
        ddiff.check_at_least("eta", self.eta, 0.0)

    def planner_scores(
        self, model: ddiff.DiffusionModel, x: ddiff.TokenBatch, proposal: ddiff.TokenBatch,
        log_mean: jax.Array, recorded: jax.Array, masked: jax.Array,
        conditioning: ddiff.Conditioning, *, keys: ddiff.KeyBatch
    ) -> tuple[jax.Array, jax.Array]:
        if self.score == "random":
            log_uniform = -jax.vmap(lambda key: ddiff.standard_exponential(key, (x.shape[1],)))(keys)
            return jnp.where(masked, log_uniform, self.eta * log_uniform), jnp.int32(0)
        picked = jnp.take_along_axis(log_mean, proposal[..., None], axis=-1)[..., 0]
        return jnp.where(masked, picked, self.eta * recorded), jnp.int32(0)
