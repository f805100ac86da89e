"""Confidence decoding (MaskGIT, Chang et al. 2022; LLaDA's low-confidence remasking)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

import ddiff
from ddiff_plugins.decoding._selection import (
    AbstractCountDecoder,
    Confidence,
    CountSchedule,
    highest,
    propose,
    still_to_decode,
)


class ConfidenceSampler(AbstractCountDecoder):
    """Confidence-ordered decoding (MaskGIT, Chang et al. 2022; LLaDA's low-confidence
    remasking, Nie et al. 2025): from all-mask, step i = 1..T evaluates mu_theta once and
    unmasks the k_i masked positions of highest confidence (:data:`Confidence`), with the
    number still masked after step i being floor(M g(i/T)) for the M positions to decode
    and g the :data:`CountSchedule` (at least one position per step, all by step T; a step
    with nothing left to unmask makes no network call). A position takes a value drawn
    from mu_theta (exactly, :func:`ddiff.categorical`), or its most probable value under
    ``greedy`` (LLaDA's temperature 0). A time-conditioned network is evaluated at the
    time whose alpha_t is the fraction of unmasked positions (:func:`network_times`).
    The loop is the driver's (:class:`AbstractCountDecoder`).

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

    confidence: Confidence = eqx.field(static=True, default="max_prob")
    schedule: CountSchedule = eqx.field(static=True, default="cosine")
    greedy: bool = eqx.field(static=True, default=False)

    def init(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, *, keys: ddiff.KeyBatch
    ) -> Any:
        """M, the positions to decode of each sample."""
        return jnp.sum(still_to_decode(prediction, tokens), axis=-1)

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        masked = still_to_decode(prediction, tokens)
        count = jnp.sum(masked, axis=-1)
        unmask = jnp.where(count > 0, jnp.clip(count - self.masked_after(carry, index), 1, count), 0)

        def decode(x):
            values, scores, selection_keys, calls = propose(prediction, x, keys, self.confidence, self.greedy)
            chosen = jax.vmap(highest)(selection_keys, jnp.where(masked, scores, -jnp.inf), unmask) & masked
            return jnp.where(chosen, values, x), jnp.int32(calls)

        tokens, calls = jax.lax.cond(jnp.any(unmask > 0), decode, lambda x: (x, jnp.int32(0)), tokens)
        return tokens, carry, calls
