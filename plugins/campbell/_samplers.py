"""Tau-leaping and predictor-corrector sampling (Campbell et al. 2022, sec. 4)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff_plugins.campbell._rates import _REQUIRES, reverse_rates


def _leap(key: ddiff.Key, x: ddiff.Tokens, rates: ddiff.StateProbs, tau: jax.Array) -> ddiff.Tokens:
    """One tau-leap of every position under ``rates`` (0 at the current state) held fixed
    for a time ``tau``: the jumps proposed at position n to each y are independent
    Poisson(tau rates[n, y]) counts. For categorical data a position moves only when
    exactly one jump is proposed there (to y with probability rates[n, y] / sum_y), and
    stays when none or several are (Campbell et al. sec. 4, tauLDR's
    ``reject_multiple_jumps``). Drawn exactly: the total count is Poisson(lambda) with
    lambda = tau sum_y rates[n, y], so P(exactly one) = lambda exp(-lambda)."""
    move_key, target_key = jax.random.split(key)
    total = tau * jnp.sum(rates, axis=-1)
    one = total * jnp.exp(-total)
    log_one = ddiff.safe_log(total) - total
    moves = ddiff.categorical(move_key, jnp.stack([log_one, jnp.log1p(-one)], axis=-1)) == 0
    target = ddiff.categorical_from_probs(target_key, rates)
    return jnp.where(moves, target, x)


class AbstractTauLeapingSampler(ddiff.AbstractGridSampler):
    """Tau-leaping on the grid 1 = t_0 > ... > t_T = 0 of :class:`ddiff.AbstractGridSampler`
    (Campbell et al. sec. 4): from t_i to t_{i+1} every position leaps under the model's
    reverse rates at t_i (:func:`reverse_rates`, from one batched mean per step), then
    concrete samplers may add corrector steps (:meth:`correct`). The reverse process starts
    from the process prior; the finish draws the output from mu_theta(x, 0) at every
    position (a draw, not tauLDR's argmax: it is the decoder of :class:`CampbellELBO`, and
    it keeps the sampler exact as the steps grow; a masked process's clean tokens are
    carried over by the mean). Labels and guidance go through :class:`ddiff.Prediction`;
    given positions are set at the start and after every leap.

    Infilling is exact for a process whose clean tokens cannot be noise (the masked
    process); for the uniform process the network reads the given tokens as possibly
    noisy, so projecting them back is the usual approximation.

    Attributes:
        steps: number of leaps T (default 256).
    """

    requires = _REQUIRES
    steps: int = eqx.field(static=True, default=256)

    def correct(
        self, prediction: ddiff.Prediction, x: ddiff.TokenBatch, s: jax.Array, tau: jax.Array, *,
        keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, jax.Array]:
        """Corrector moves at time s after a predictor step of length tau, sample i's
        randomness from ``keys[i]``; returns the tokens and the network calls made
        (default: none)."""
        return x, jnp.int32(0)

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, t: ddiff.Time,
        s: ddiff.Time, *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        process = prediction.model.process
        split = jax.vmap(jax.random.split)(keys)
        leap_keys, correct_keys = split[:, 0], split[:, 1]
        log_mean, calls = prediction.log_mean(tokens, t)
        rates = jax.vmap(lambda lm, xi: reverse_rates(process, lm, xi, t))(log_mean, tokens)
        leapt = jax.vmap(_leap, (0, 0, 0, None))(leap_keys, tokens, rates, t - s)
        x, used = self.correct(
            prediction,
            ddiff.apply_fixed(prediction.conditioning, leapt),
            s,
            t - s,
            keys=correct_keys,
        )
        return x, carry, calls + used

    def finish(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, *,
        keys: ddiff.KeyBatch
    ) -> ddiff.SampleOutput:
        log_mean, calls = prediction.log_mean(tokens, jnp.zeros(()))
        drawn = jax.vmap(ddiff.categorical)(keys, log_mean)
        return ddiff.SampleOutput(
            tokens=ddiff.apply_fixed(prediction.conditioning, drawn),
            num_function_evals=jnp.int32(calls),
        )


class TauLeapingSampler(AbstractTauLeapingSampler):
    """Tau-leaping (Campbell et al. sec. 4): every position leaps independently under the
    reverse rates at the start of each step, moving only when exactly one jump is
    proposed there.

    Attributes:
        steps: number of leaps T (network evaluations: T + 1, doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    def reverse_chain(self) -> ddiff.ReverseChain | None:
        return ddiff.ReverseChain(step="tau_leap", reads="mean", times=self.times(), final="mean")


class PredictorCorrectorSampler(AbstractTauLeapingSampler):
    """Tau-leaping with corrector steps (Campbell et al. sec. 4.2): after each
    leap to time s <= ``corrector_entry_time`` (s > 0), ``corrector_steps`` leaps of length
    ``corrector_step_size`` x (step length) under the rates R_s(x -> y) + R̂_s(x -> y),
    forward plus reverse, whose CTMC leaves q_s invariant; each is one more network call.
    A leap keeps that invariance only to first order in its length (a position moves with
    probability lambda e^-lambda, not in proportion to lambda), so long corrector leaps
    add a bias of their own. The defaults are tauLDR's settings for categorical data
    (its piano configuration): 2 corrector leaps of 0.1 step from t = 0.9.

    Attributes:
        steps: number of predictor leaps T.
        grid: ``uniform`` or ``cosine`` time grid.
        corrector_steps: corrector leaps after each predictor leap.
        corrector_step_size: their length as a multiple of the predictor's.
        corrector_entry_time: correctors run only at times s <= this.
    """

    corrector_steps: int = eqx.field(static=True, default=2)
    corrector_step_size: float = eqx.field(static=True, default=0.1)
    corrector_entry_time: float = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        ddiff.check_at_least("corrector_steps", self.corrector_steps)
        if not self.corrector_step_size > 0:
            raise ddiff.RecipeError(
                f"corrector_step_size must be positive, got {self.corrector_step_size}",
                path="corrector_step_size",
            )
        if not 0.0 <= self.corrector_entry_time <= 1.0:
            raise ddiff.RecipeError(
                f"must be in [0, 1], got {self.corrector_entry_time}",
                path="corrector_entry_time",
            )

    def reverse_chain(self) -> ddiff.ReverseChain | None:
        return ddiff.ReverseChain(
            step="tau_leap",
            reads="mean",
            times=self.times(),
            final="mean",
            corrector_steps=self.corrector_steps,
            corrector_size=self.corrector_step_size,
            corrector_entry=self.corrector_entry_time,
        )

    def correct(
        self, prediction: ddiff.Prediction, x: ddiff.TokenBatch, s: jax.Array, tau: jax.Array, *,
        keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, jax.Array]:
        process = prediction.model.process

        def corrector(x, index):
            log_mean, _ = prediction.log_mean(x, s)

            def rates(lm, xi):
                forward = process.forward_rates(xi, s)
                forward = jnp.where(
                    jax.nn.one_hot(xi, process.num_states, dtype=bool), 0.0, forward
                )
                return forward + reverse_rates(process, lm, xi, s)

            moved = jax.vmap(_leap, (0, 0, 0, None))(
                ddiff.step_keys(keys, index), x, jax.vmap(rates)(log_mean, x),
                self.corrector_step_size * tau,
            )  # fmt: skip
            return ddiff.apply_fixed(prediction.conditioning, moved), None

        def run(x):
            x, _ = jax.lax.scan(corrector, x, jnp.arange(self.corrector_steps))
            return x, jnp.int32(self.corrector_steps * prediction.calls)

        active = (s > 0) & (s <= self.corrector_entry_time)
        return jax.lax.cond(active, run, lambda x: (x, jnp.int32(0)), x)
