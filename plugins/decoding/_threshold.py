"""Threshold parallel decoding (Fast-dLLM, Wu et al. 2025)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

import ddiff
from ddiff_plugins.decoding._selection import (
    _REQUIRES,
    Confidence,
    check_temperature,
    propose,
    still_to_decode,
    threshold_selection,
)


class ThresholdSampler(ddiff.AbstractLoopSampler):
    """Threshold (parallel) decoding (Fast-dLLM, Wu et al. 2025, as used with LLaDA):
    every step evaluates mu_theta once and unmasks every masked position whose confidence
    (:data:`Confidence`) exceeds ``threshold``, or, where none does, the single most
    confident one (:func:`threshold_selection`); the driver's loop ends when no position
    of the batch is masked, after at most M steps for M positions to decode. Values are
    drawn from mu_theta^(1/temperature), or taken as its mode under ``greedy`` or at
    ``temperature: 0`` (Fast-dLLM's setting); mu is the prediction after the
    ``transforms``. A time-conditioned network is evaluated at the time whose alpha_t is
    the fraction of unmasked positions.

    Distribution: a heuristic that is not the model's distribution (positions above the
    threshold are decoded together from one prediction, independently), except when the
    threshold is never exceeded (``threshold >= 1`` with ``max_prob``): then one position
    is decoded per step, in an order that depends only on what is revealed, and with
    values drawn at temperature 1 the sampler is exact for an exact denoiser (the
    conformance kit checks it).

    Attributes:
        threshold: the confidence a position must exceed (a probability for ``max_prob``,
            ``margin`` and ``drawn_prob``, nats <= 0 for ``neg_entropy``).
        confidence: ``max_prob``, ``margin``, ``neg_entropy`` or ``drawn_prob``
            (``random`` ignores mu, so no threshold means anything for it).
        greedy: take each position's most probable value instead of a draw (temperature 0).
        temperature: values are drawn from mu^(1/temperature) (>= 0; 0 is ``greedy``).
        transforms: log-probability transforms of mu, in order.
    """

    requires = _REQUIRES
    threshold: float = eqx.field(static=True, default=0.9)
    confidence: Confidence = eqx.field(static=True, default="max_prob")
    greedy: bool = eqx.field(static=True, default=False)
    temperature: float = eqx.field(static=True, default=1.0)
    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()

    def __check_init__(self):
        check_temperature(self.temperature, self.greedy)
        if self.confidence == "random":
            raise ddiff.RecipeError(
                "a threshold on random scores ignores the model; use confidence max_prob, "
                "margin, neg_entropy or drawn_prob (or sampler confidence for random order)",
                path="confidence",
            )

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        return ~jnp.any(still_to_decode(prediction, tokens))

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        masked = still_to_decode(prediction, tokens)
        temperature = 0.0 if self.greedy else self.temperature
        values, scores, selection_keys, calls = propose(prediction, tokens, keys, self.confidence, temperature)
        chosen = jax.vmap(threshold_selection, (0, 0, 0, None))(selection_keys, scores, masked, self.threshold)
        return jnp.where(chosen, values, tokens), carry, calls
