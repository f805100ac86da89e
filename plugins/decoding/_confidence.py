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
    check_temperature,
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
    from mu_theta^(1/temperature) (exactly, :func:`ddiff.categorical`), or its most
    probable value at ``temperature: 0`` or under ``greedy`` (LLaDA's temperature 0);
    the confidence is read from the untempered mu (``drawn_prob``: the probability of the
    value drawn, LLaDA's ``low_confidence``; ``random``: LLaDA's ``random`` remasking). mu
    is the prediction after the ``transforms`` (e.g. ``suppress_tokens``, LLaDA's
    ``logits_eos_inf``), which the confidence reads too; ``confidence_suppress_tokens``
    gives the listed values probability 0 in the confidence only, after the draw (LLaDA's
    ``confidence_eos_eot_inf``: a drawn listed value has confidence 0, the others are
    renormalised without the listed mass). A time-conditioned network is
    evaluated at the time whose alpha_t is the fraction of unmasked positions
    (:func:`network_times`). The loop is the driver's (:class:`AbstractCountDecoder`).

    LLaDA's ``generate`` within one block is ``schedule: remainder_first`` with
    ``confidence: drawn_prob`` (or ``random``) at its temperature; its blocks are
    ``semi_ar`` around this sampler (docs/sampling.md has the table).

    Distribution: with one position per step (e.g. T >= M with the linear schedule) and
    values drawn at temperature 1 it is exact for an exact denoiser, whatever the order:
    each step draws one position from its conditional given the revealed ones, and the
    order depends only on what is revealed (the conformance kit checks it). Otherwise it
    is a heuristic that is not the model's distribution: several positions decoded from
    one prediction are drawn independently, the confidence order favours what a learnt
    denoiser is sure of, and a temperature other than 1 (``greedy`` included) changes mu.
    With ``random`` the order is uniform whatever is drawn, so several positions per step
    are independent draws at uniformly chosen positions.

    Attributes:
        steps: decoding steps T (network evaluations at most T, doubled under guidance).
        confidence: ``max_prob``, ``margin``, ``neg_entropy``, ``drawn_prob`` or
            ``random`` (:data:`Confidence`).
        schedule: ``cosine``, ``linear`` or ``remainder_first``: how many positions stay
            masked after each step.
        greedy: take each position's most probable value instead of a draw (temperature 0).
        temperature: values are drawn from mu^(1/temperature) (>= 0; 0 is ``greedy``).
        transforms: log-probability transforms of mu, in order, before values and
            confidences are read.
        confidence_suppress_tokens: values removed from mu when the confidence is read
            (LLaDA's ``confidence_eos_eot_inf``: [126081, 126348] at temperature 0,
            [126348] above; docs/sampling.md).
    """

    confidence: Confidence = eqx.field(static=True, default="max_prob")
    schedule: CountSchedule = eqx.field(static=True, default="cosine")
    greedy: bool = eqx.field(static=True, default=False)
    temperature: float = eqx.field(static=True, default=1.0)
    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()
    confidence_suppress_tokens: tuple[int, ...] = eqx.field(static=True, default=())

    def __check_init__(self):
        check_temperature(self.temperature, self.greedy)
        if self.confidence_suppress_tokens and self.confidence == "random":
            raise ddiff.RecipeError(
                "confidence_suppress_tokens changes the confidence read from mu and "
                "confidence: random reads none; drop one of them",
                path="confidence_suppress_tokens",
            )
        if self.confidence_suppress_tokens and min(self.confidence_suppress_tokens) < 0:
            raise ddiff.RecipeError(
                f"token values must be >= 0, got {list(self.confidence_suppress_tokens)}",
                path="confidence_suppress_tokens",
            )

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
            temperature = 0.0 if self.greedy else self.temperature
            values, scores, selection_keys, calls = propose(
                prediction, x, keys, self.confidence, temperature, self.confidence_suppress_tokens
            )
            chosen = jax.vmap(highest)(selection_keys, jnp.where(masked, scores, -jnp.inf), unmask) & masked
            return jnp.where(chosen, values, x), jnp.int32(calls)

        tokens, calls = jax.lax.cond(jnp.any(unmask > 0), decode, lambda x: (x, jnp.int32(0)), tokens)
        return tokens, carry, calls
