"""What decoding samplers share: confidence scores, count schedules, top-k selection."""

import math
from typing import Literal

import jax
import jax.numpy as jnp

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


def network_times(
    schedule: ddiff.AbstractSchedule, masked: jax.Array, seq_len: int
) -> jax.Array:
    """The time at which a sample with ``masked`` masked positions of ``seq_len`` is
    typical, one per sample: alpha_t = 1 - masked / seq_len (:func:`ddiff.time_of_alpha`).
    A time-conditioned network is evaluated there; count-based decoders have no grid."""
    return ddiff.time_of_alpha(schedule, 1.0 - masked.astype(jnp.float32) / seq_len)


def _values(key: ddiff.Key, log_mean: ddiff.LogProbs, greedy: bool) -> ddiff.Tokens:
    if greedy:
        return jnp.argmax(log_mean, axis=-1).astype(jnp.int32)
    return ddiff.categorical(key, log_mean)
