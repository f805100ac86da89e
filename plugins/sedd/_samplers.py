"""SEDD's samplers: Euler steps of the reverse CTMC and the analytic (Tweedie) step, step rules
over :func:`ddiff.run_sampler`."""

import abc
from typing import Any

import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

# --------------------------------------------------------------------------- samplers


class AbstractScoreSampler(ddiff.AbstractGridSampler):
    """Reverse sampling with scores on the grid 1 = t_0 > ... > t_T = 0 of
    :class:`ddiff.AbstractGridSampler`, as SEDD's predictor loop (their sampling.py): the
    reverse process starts from the process prior, every step draws all positions
    independently from :meth:`step_probs` (one batched score per step, labels and
    classifier-free guidance through :meth:`ddiff.Prediction.log_score`), and the driver
    projects the given positions back after every step (SEDD's infilling). The finish, a
    denoising step at the grid's last time, draws every position from the Tweedie mean of
    the scores (:meth:`~ddiff.AbstractForwardProcess.log_mean_from_score`, SEDD's noise
    removal), which also resolves positions still masked. Network evaluations: steps + 1
    (doubled under guidance).
    """

    @property
    @abc.abstractmethod
    def step_rule(self) -> str:
        """The :class:`ddiff.ReverseChain` rule of :meth:`step_probs`."""

    def reverse_chain(self) -> ddiff.ReverseChain | None:
        return ddiff.ReverseChain(
            step=self.step_rule, reads="score", times=self.times(), final="tweedie"
        )

    @abc.abstractmethod
    def step_probs(
        self, process: ddiff.AbstractForwardProcess, x: ddiff.Tokens,
        log_score: ddiff.StateLogProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        """Unnormalised probabilities of each position's state at time s < t, given the
        state x at t and its log scores (one example)."""

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, t: ddiff.Time,
        s: ddiff.Time, *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        process = prediction.model.process
        log_score, calls = prediction.log_score(tokens, t)
        probs = jax.vmap(lambda x, log_score: self.step_probs(process, x, log_score, s, t))(
            tokens, log_score
        )
        stuck = jnp.sum(probs, axis=-1, keepdims=True) <= 0
        probs = jnp.where(stuck, jax.nn.one_hot(tokens, process.num_states), probs)
        return jax.vmap(ddiff.categorical_from_probs)(keys, probs), carry, calls

    def finish(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, *,
        keys: ddiff.KeyBatch
    ) -> ddiff.SampleOutput:
        process = prediction.model.process
        end = self.times()[-1]
        log_score, calls = prediction.log_score(tokens, end)
        log_mean = jax.vmap(lambda log_score, x: process.log_mean_from_score(log_score, x, end))(
            log_score, tokens
        )
        drawn = jax.vmap(ddiff.categorical)(keys, log_mean)
        return ddiff.SampleOutput(
            tokens=ddiff.apply_fixed(prediction.conditioning, drawn),
            num_function_evals=jnp.int32(calls),
        )


class EulerSampler(AbstractScoreSampler):
    """SEDD's Euler predictor: from t to s every position moves from x^n to y != x^n with
    probability (t - s) R_t(y -> x^n) s_theta[n, y] and stays otherwise (the first-order
    step of the reverse CTMC, Lou et al. 2024 sec. 4.1); where the moves exceed 1 the stay
    probability is 0 and the moves are renormalised, as SEDD's draw does.

    Attributes:
        steps: number of reverse steps T (network evaluations T + 1).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    requires = {
        "parameterization": frozenset({caps.SCORE}),
        "process": frozenset({caps.RATES, caps.FACTORIZED}),
    }

    @property
    def step_rule(self):
        return "euler"

    def step_probs(
        self, process: ddiff.AbstractForwardProcess, x: ddiff.Tokens,
        log_score: ddiff.StateLogProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        incoming = process.incoming_rates(x, t)
        moving = (incoming > 0) & ~jax.nn.one_hot(x, process.num_states, dtype=bool)
        rates = jnp.where(moving, incoming * jnp.exp(jnp.where(moving, log_score, 0.0)), 0.0)
        moves = (t - s) * rates
        stay = jnp.maximum(1.0 - jnp.sum(moves, axis=-1, keepdims=True), 0.0)
        return moves + stay * jax.nn.one_hot(x, process.num_states)


class AnalyticSampler(AbstractScoreSampler):
    """SEDD's analytic predictor, Tweedie tau-leaping (Lou et al. 2024, Thm. 4.2): each
    position jumps from x^n at t to y at s with probability proportional to

        [Q_{s->t}^{-T} s_theta]_y  q(x_t^n | x_s^n = y),

    the exact reverse transition of one position given the others when the scores are
    exact (for the absorbing graph it is MD4's ancestral step). The "staggered score"
    comes from :meth:`~ddiff.AbstractTransitionProcess.unpropagate`; negative values a
    model's scores can give are clipped at 0, as SEDD's draw does.

    Attributes:
        steps: number of reverse steps T (network evaluations T + 1).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    requires = {
        "parameterization": frozenset({caps.SCORE}),
        "process": frozenset({caps.TRANSITIONS, caps.FACTORIZED}),
    }

    @property
    def step_rule(self):
        return "tweedie"

    def step_probs(
        self, process: ddiff.AbstractForwardProcess, x: ddiff.Tokens,
        log_score: ddiff.StateLogProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        staggered = process.unpropagate(jnp.exp(log_score), s, t)
        return jnp.maximum(staggered, 0.0) * process.transition_likelihood(x, s, t)
