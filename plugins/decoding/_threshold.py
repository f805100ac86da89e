"""Threshold parallel decoding (Fast-dLLM, Wu et al. 2025)."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff_plugins.decoding._selection import (
    _REQUIRES,
    Confidence,
    _values,
    confidence,
    network_times,
    threshold_selection,
)


class ThresholdSampler(ddiff.AbstractSampler):
    """Threshold (parallel) decoding (Fast-dLLM, Wu et al. 2025, as used with LLaDA):
    every step evaluates mu_theta once and unmasks every masked position whose confidence
    (:data:`Confidence`) exceeds ``threshold``, or, where none does, the single most
    confident one (:func:`threshold_selection`); the loop (a ``lax.while_loop``) ends when
    no position of the batch is masked, after at most M steps for M positions to decode.
    Values are drawn from mu_theta, or taken as its mode under ``greedy`` (Fast-dLLM's
    setting). A time-conditioned network is evaluated at the time whose alpha_t is the
    fraction of unmasked positions.

    Distribution: a heuristic that is not the model's distribution (positions above the
    threshold are decoded together from one prediction, independently), except when the
    threshold is never exceeded (``threshold >= 1`` with ``max_prob``): then one position
    is decoded per step, in an order that depends only on what is revealed, and with drawn
    values the sampler is exact for an exact denoiser (the conformance kit checks it).

    Attributes:
        threshold: the confidence a position must exceed (a probability for ``max_prob``
            and ``margin``, nats <= 0 for ``neg_entropy``).
        confidence: ``max_prob``, ``margin`` or ``neg_entropy``.
        greedy: take each position's most probable value instead of a draw.
    """

    requires = _REQUIRES
    threshold: float = eqx.field(static=True, default=0.9)
    confidence: Confidence = eqx.field(static=True, default="max_prob")
    greedy: bool = eqx.field(static=True, default=False)

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)

        def body(state):
            x, evals, index = state
            masked = ddiff.still_masked(conditioning, x, mask_id)
            times = network_times(process.schedule, jnp.sum(x == mask_id, axis=-1), seq_len)
            log_mean, calls = ddiff.batched_log_mean(model, x, times, conditioning)
            split = jax.vmap(lambda key: jax.random.split(key, 2))(ddiff.step_keys(start.loop_keys, index))
            values = jax.vmap(lambda key, lm: _values(key, lm, self.greedy))(split[:, 0], log_mean)
            scores = jax.vmap(lambda lm: confidence(lm, self.confidence))(log_mean)
            chosen = jax.vmap(threshold_selection, (0, 0, 0, None))(split[:, 1], scores, masked, self.threshold)
            x = ddiff.apply_fixed(conditioning, jnp.where(chosen, values, x))
            return x, evals + calls, index + 1

        x, evals, _ = jax.lax.while_loop(
            lambda state: jnp.any(ddiff.still_masked(conditioning, state[0], mask_id)),
            body,
            (start.tokens, jnp.int32(0), jnp.int32(0)),
        )
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)
