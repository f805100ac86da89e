"""Confidence decoding (MaskGIT, Chang et al. 2022; LLaDA's low-confidence remasking)."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff_plugins.decoding._selection import (
    _REQUIRES,
    Confidence,
    CountSchedule,
    _values,
    confidence,
    highest,
    network_times,
    remaining_fraction,
)


class ConfidenceSampler(ddiff.AbstractSampler):
    """Confidence-ordered decoding (MaskGIT, Chang et al. 2022; LLaDA's low-confidence
    remasking, Nie et al. 2025): from all-mask, step i = 1..T evaluates mu_theta once and
    unmasks the k_i masked positions of highest confidence (:data:`Confidence`), with the
    number still masked after step i being floor(M g(i/T)) for the M positions to decode
    and g the :data:`CountSchedule` (at least one position per step, all by step T; a step
    with nothing left to unmask makes no network call). A position takes a value drawn
    from mu_theta (exactly, :func:`ddiff.categorical`), or its most probable value under
    ``greedy`` (LLaDA's temperature 0). A time-conditioned network is evaluated at the
    time whose alpha_t is the fraction of unmasked positions (:func:`network_times`).

    Distribution: with one position per step (e.g. T >= M with the linear schedule) and
    drawn values it is exact for an exact denoiser, whatever the order: each step draws
    one position from its conditional given the revealed ones, and the order depends only
    on what is revealed (the conformance kit checks it). Otherwise it is a heuristic that
    is not the model's distribution: several positions decoded from one prediction are
    drawn independently, the confidence order favours what a learnt denoiser is sure of,
    and ``greedy`` takes modes.

    Attributes:
        steps: decoding steps T (network evaluations at most T, doubled under guidance).
        confidence: ``max_prob``, ``margin`` or ``neg_entropy``.
        schedule: ``cosine`` or ``linear``: how many positions stay masked after each step.
        greedy: take each position's most probable value instead of a draw.
    """

    requires = _REQUIRES
    steps: int = eqx.field(static=True, default=64)
    confidence: Confidence = eqx.field(static=True, default="max_prob")
    schedule: CountSchedule = eqx.field(static=True, default="cosine")
    greedy: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        total = jnp.sum(ddiff.still_masked(conditioning, start.tokens, mask_id), axis=-1)

        def step(carry, index):
            x, evals = carry
            masked = ddiff.still_masked(conditioning, x, mask_id)
            count = jnp.sum(masked, axis=-1)
            done = (index + 1).astype(jnp.float32) / self.steps
            left = jnp.floor(total * remaining_fraction(self.schedule, done)).astype(jnp.int32)
            unmask = jnp.where(count > 0, jnp.clip(count - left, 1, count), 0)

            def decode(x):
                times = network_times(process.schedule, jnp.sum(x == mask_id, axis=-1), seq_len)
                log_mean, calls = ddiff.batched_log_mean(model, x, times, conditioning)
                split = jax.vmap(lambda key: jax.random.split(key, 2))(
                    ddiff.step_keys(start.loop_keys, index)
                )
                values = jax.vmap(lambda key, lm: _values(key, lm, self.greedy))(split[:, 0], log_mean)
                scores = jnp.where(masked, jax.vmap(lambda lm: confidence(lm, self.confidence))(log_mean), -jnp.inf)
                chosen = jax.vmap(highest)(split[:, 1], scores, unmask) & masked
                return ddiff.apply_fixed(conditioning, jnp.where(chosen, values, x)), jnp.int32(calls)

            x, used = jax.lax.cond(
                jnp.any(unmask > 0), decode, lambda x: (x, jnp.int32(0)), x
            )
            return (x, evals + used), None

        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), jnp.arange(self.steps, dtype=jnp.int32)
        )
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)
