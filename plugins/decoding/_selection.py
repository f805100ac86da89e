"""What decoding samplers share: confidence scores, count schedules, top-k selection, the
prediction at the time a masked fraction is typical, and the count decoders' step loop."""

import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

import ddiff
from ddiff import capabilities as caps

Confidence = Literal["max_prob", "margin", "neg_entropy"]
"""How sure the model is of a position, from its mu: the largest probability, the gap
between the two largest, or the negative entropy sum_v mu[v] log mu[v] (nats, <= 0)."""

CountSchedule = Literal["cosine", "linear"]
"""The fraction of the positions to decode that is still masked after a fraction r of the
steps: cos(pi/2 r) (MaskGIT) or 1 - r (LLaDA, P2's kappa(t) = t)."""

_REQUIRES = {
    "parameterization": frozenset({caps.MEAN}),
    "process": frozenset({caps.MASKED}),
}


def confidence(log_mean: ddiff.LogProbs, kind: Confidence) -> jax.Array:
    """The confidence of every position of one sequence, shape (seq,): see
    :data:`Confidence`."""
    probs = jnp.exp(log_mean)
    if kind == "max_prob":
        return jnp.max(probs, axis=-1)
    if kind == "margin":
        top, _ = jax.lax.top_k(probs, 2)
        return top[..., 0] - top[..., 1]
    return jnp.sum(jnp.where(probs > 0, probs * log_mean, 0.0), axis=-1)


def remaining_fraction(kind: CountSchedule, done: jax.Array) -> jax.Array:
    """The fraction of positions still masked after a fraction ``done`` of the steps
    (:data:`CountSchedule`), exactly 0 at the end."""
    if kind == "linear":
        left = 1.0 - done
    else:
        left = jnp.cos(0.5 * math.pi * done)
    return jnp.where(done >= 1.0, 0.0, jnp.clip(left, 0.0, 1.0))


def masked_count(
    kind: CountSchedule, steps: int, total: Int[Array, "*batch"], done: Int[Array, ""]
) -> Int[Array, "*batch"]:
    """floor(M g(i/T)) for M = ``total`` positions to decode after step i = ``done`` of
    T = ``steps`` (:data:`CountSchedule`; 0 from step T on), without rounding the fraction
    first. ``linear``: (M (T - i)) // T in integers, exact. ``cosine``: g(i/T) =
    cos(pi/2 i/T) tabulated in float64 for the T + 1 steps (exactly 1, 1/2 and 0 where the
    cosine is rational), one float32 product with M; float32's fraction i/T rounded before
    the cosine or the subtraction is what put counts one below the schedule (M = T = 3 gave
    [2, 1, 0])."""
    done = jnp.clip(done, 0, steps)
    if kind == "linear":
        return (total * (steps - done)) // steps
    fractions = np.cos(0.5 * np.pi * np.arange(steps + 1) / steps)
    fractions[[0, -1]] = 1.0, 0.0
    if steps % 3 == 0:
        fractions[2 * steps // 3] = 0.5
    table = jnp.asarray(fractions, jnp.float32)
    return jnp.floor(total.astype(jnp.float32) * table[done]).astype(jnp.int32)


def highest(key: ddiff.Key, scores: jax.Array, count: jax.Array) -> jax.Array:
    """Which ``count`` positions of one sequence have the highest scores (ties broken
    uniformly at random by ``key``), as a boolean mask of shape (seq,)."""
    size = scores.shape[0]
    permutation = jax.random.permutation(key, size)
    order = permutation[jnp.argsort(-scores[permutation], stable=True)]
    rank = jnp.zeros((size,), jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
    return rank < count


def threshold_selection(
    key: ddiff.Key, scores: jax.Array, candidates: jax.Array, threshold: float
) -> jax.Array:
    """The positions a threshold decoder unmasks in one step of one sequence: every
    candidate whose score exceeds ``threshold``, or, where none does, the single candidate
    with the highest score (ties broken at random); none without candidates."""
    above = candidates & (scores > threshold)
    best = highest(key, jnp.where(candidates, scores, -jnp.inf), 1) & candidates
    return jnp.where(jnp.any(above), above, best)


def network_times(schedule: ddiff.AbstractSchedule, masked: jax.Array, seq_len: int) -> jax.Array:
    """The time at which a sample with ``masked`` masked positions of ``seq_len`` is
    typical, one per sample: alpha_t = 1 - masked / seq_len (:func:`ddiff.time_of_alpha`).
    A time-conditioned network is evaluated there; count-based decoders have no grid."""
    return ddiff.time_of_alpha(schedule, 1.0 - masked.astype(jnp.float32) / seq_len)


def still_to_decode(prediction: ddiff.Prediction, tokens: ddiff.TokenBatch) -> jax.Array:
    """The positions still masked and not given (:func:`ddiff.still_masked`), shape
    (batch, seq)."""
    return ddiff.still_masked(prediction.conditioning, tokens, prediction.model.process.mask_id)


def predict_where_typical(
    prediction: ddiff.Prediction, tokens: ddiff.TokenBatch
) -> tuple[jax.Array, int]:
    """log mu_theta of every sample at the time its masked fraction is typical
    (:func:`network_times`), and the network calls it took."""
    process = prediction.model.process
    masked = jnp.sum(tokens == process.mask_id, axis=-1)
    return prediction.log_mean(tokens, network_times(process.schedule, masked, tokens.shape[1]))


def propose(
    prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, keys: ddiff.KeyBatch, kind: Confidence,
    greedy: bool
) -> tuple[ddiff.TokenBatch, jax.Array, ddiff.KeyBatch, int]:
    """What a confidence decoder reads in one step (:func:`predict_where_typical`): a value
    for every position (a draw from mu_theta, or its mode under ``greedy``), the confidence
    of every position, one key per sample left for the selection, and the network calls."""
    log_mean, calls = predict_where_typical(prediction, tokens)
    split = jax.vmap(lambda key: jax.random.split(key, 2))(keys)
    if greedy:
        values = jnp.argmax(log_mean, axis=-1).astype(jnp.int32)
    else:
        values = jax.vmap(ddiff.categorical)(split[:, 0], log_mean)
    scores = jax.vmap(lambda lm: confidence(lm, kind))(log_mean)
    return values, scores, split[:, 1], calls


class AbstractCountDecoder(ddiff.AbstractLoopSampler):
    """A decoder of T = ``steps`` steps that follows a count schedule: after step
    i = 1..T, floor(M g(i/T)) of the M positions to decode are masked (g the
    :data:`CountSchedule`, 0 after step T). Steps k = 0..T-1 run in the driver's loop
    (:func:`ddiff.run_sampler`); concrete decoders write the step.

    Attributes:
        steps: T (>= 1).
        schedule: the :data:`CountSchedule` g.
    """

    requires = _REQUIRES
    steps: int = eqx.field(static=True, default=64)
    schedule: eqx.AbstractVar[CountSchedule]

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        return index >= self.steps

    def masked_after(self, total: jax.Array, index: jax.Array) -> jax.Array:
        """floor(total g((index + 1) / T)): how many of ``total`` positions to decode
        (one count per sample) are masked after step ``index`` (from 0), computed by
        :func:`masked_count` without rounding the fraction first."""
        return masked_count(self.schedule, self.steps, total, index + 1)
