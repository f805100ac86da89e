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
from ddiff_plugins.decoding._suppress import SuppressTokens

Confidence = Literal["max_prob", "margin", "neg_entropy", "drawn_prob", "random"]
"""How sure the model is of a position, from its mu: the largest probability, the gap
between the two largest, the negative entropy sum_v mu[v] log mu[v] (nats, <= 0), the
probability mu[v] of the value v drawn there (LLaDA's ``low_confidence`` remasking at any
temperature; ``max_prob`` when values are modes), or a uniform draw U(0, 1) that ignores
mu (LLaDA's ``random`` remasking: the positions to unmask chosen uniformly)."""

CountSchedule = Literal["cosine", "linear", "remainder_first"]
"""How many of the M positions to decode are still masked after step i of T:
floor(M g(i/T)) with g(r) = cos(pi/2 r) (``cosine``, MaskGIT) or 1 - r (``linear``, P2's
kappa(t) = t), or M - i floor(M/T) - min(i, M mod T) (``remainder_first``, LLaDA's
``get_num_transfer_tokens``: floor(M/T) per step and one more in each of the first
M mod T steps; 16 over 6 steps unmask 3, 3, 3, 3, 2, 2 where ``linear`` unmasks
3, 3, 2, 3, 3, 2)."""

_REQUIRES = {
    "parameterization": frozenset({caps.MEAN}),
    "process": frozenset({caps.MASKED}),
}


def confidence(
    log_mean: ddiff.LogProbs, kind: Confidence, values: ddiff.Tokens | None = None,
    key: ddiff.Key | None = None
) -> jax.Array:
    """The confidence of every position of one sequence, shape (seq,): see
    :data:`Confidence`. ``drawn_prob`` reads the drawn ``values``, ``random`` draws from
    ``key``."""
    probs = jnp.exp(log_mean)
    if kind == "max_prob":
        return jnp.max(probs, axis=-1)
    if kind == "margin":
        top, _ = jax.lax.top_k(probs, 2)
        return top[..., 0] - top[..., 1]
    if kind == "drawn_prob":
        return jnp.take_along_axis(probs, values[..., None], axis=-1)[..., 0]
    if kind == "random":
        return jax.random.uniform(key, log_mean.shape[:-1])
    return jnp.sum(jnp.where(probs > 0, probs * log_mean, 0.0), axis=-1)


def remaining_fraction(kind: CountSchedule, done: jax.Array) -> jax.Array:
    """The fraction of positions still masked after a fraction ``done`` of the steps
    (:data:`CountSchedule`), exactly 0 at the end; ``remainder_first`` has no fraction of
    its own (its counts are not a function of i/T alone) and reads as ``linear``, whose
    counts it redistributes."""
    if kind in ("linear", "remainder_first"):
        left = 1.0 - done
    else:
        left = jnp.cos(0.5 * math.pi * done)
    return jnp.where(done >= 1.0, 0.0, jnp.clip(left, 0.0, 1.0))


def masked_count(
    kind: CountSchedule, steps: int, total: Int[Array, "*batch"], done: Int[Array, ""]
) -> Int[Array, "*batch"]:
    """floor(M g(i/T)) for M = ``total`` positions to decode after step i = ``done`` of
    T = ``steps`` (:data:`CountSchedule`; 0 from step T on), without rounding the fraction
    first. ``linear``: (M (T - i)) // T in integers, exact. ``remainder_first``:
    M - i (M // T) - min(i, M mod T) in integers, exact (LLaDA's counts). ``cosine``:
    g(i/T) = cos(pi/2 i/T) tabulated in float64 for the T + 1 steps (exactly 1, 1/2 and 0
    where the cosine is rational), one float32 product with M; float32's fraction i/T
    rounded before the cosine or the subtraction is what put counts one below the schedule
    (M = T = 3 gave [2, 1, 0])."""
    done = jnp.clip(done, 0, steps)
    if kind == "linear":
        return (total * (steps - done)) // steps
    if kind == "remainder_first":
        return total - done * (total // steps) - jnp.minimum(done, total % steps)
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


def check_temperature(temperature: float, greedy: bool) -> None:
    """Refuses a negative temperature, and ``greedy`` (the mode, temperature 0) with a
    temperature other than 1, in one line."""
    ddiff.check_at_least("temperature", temperature, 0.0)
    if greedy and temperature != 1.0:
        raise ddiff.RecipeError(
            f"greedy takes modes (temperature 0) and cannot combine with temperature "
            f"{temperature}; set one of them",
            path="temperature",
        )


def draw_values(key: ddiff.Key, log_mean: ddiff.LogProbs, temperature: float) -> ddiff.Tokens:
    """A value for every position of one sequence: a draw from mu^(1/temperature),
    normalised (exactly, :func:`ddiff.categorical`; LLaDA's Gumbel-max of logits /
    temperature, in float64 there), mu itself at temperature 1, the mode at 0."""
    if temperature == 0.0:
        return jnp.argmax(log_mean, axis=-1).astype(jnp.int32)
    if temperature == 1.0:
        return ddiff.categorical(key, log_mean)
    return ddiff.categorical(key, log_mean / temperature)


def propose(
    prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, keys: ddiff.KeyBatch, kind: Confidence,
    temperature: float, confidence_suppressed: tuple[int, ...] = ()
) -> tuple[ddiff.TokenBatch, jax.Array, ddiff.KeyBatch, int]:
    """What a confidence decoder reads in one step (:func:`predict_where_typical`): a value
    for every position (:func:`draw_values` at ``temperature``, 0 for the mode), the
    confidence of every position (:func:`confidence`, of the untempered mu: LLaDA's
    ``low_confidence`` reads softmax(logits) at the value drawn from softmax(logits / T);
    with ``confidence_suppressed``, of mu with those values given probability 0 after the
    draw, :class:`SuppressTokens`), one key per sample left for the selection, and the
    network calls."""
    log_mean, calls = predict_where_typical(prediction, tokens)
    split = jax.vmap(lambda key: jax.random.split(key, 2))(keys)
    values = jax.vmap(lambda key, lm: draw_values(key, lm, temperature))(split[:, 0], log_mean)
    score_keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(split[:, 1])
    scored = SuppressTokens(tokens=confidence_suppressed)(log_mean) if confidence_suppressed else log_mean
    scores = jax.vmap(lambda lm, v, key: confidence(lm, kind, v, key))(scored, values, score_keys)
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
