"""Tau-leaping and predictor-corrector sampling (Campbell et al. 2022, sec. 4)."""

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


class AbstractTauLeapingSampler(ddiff.AbstractSampler):
    """Tau-leaping on a time grid 1 = t_0 > ... > t_T = 0 (Campbell et al. sec. 4): from
    t_i to t_{i+1} every position leaps under the model's reverse rates at t_i
    (:func:`reverse_rates`, from one batched mean per step), then concrete samplers may
    add corrector steps. The reverse process starts from the process prior; the output
    is drawn from mu_theta(x, 0) at every position (a draw, not tauLDR's argmax: it is the
    decoder of :class:`CampbellELBO`, and it keeps the sampler exact as the steps grow;
    a masked process's clean tokens are carried over by the mean). The loop is one
    ``lax.scan``; labels and guidance go through :func:`ddiff.batched_log_mean`; given
    positions are set at the start and after every leap.

    Infilling is exact for a process whose clean tokens cannot be noise (the masked
    process); for the uniform process the network reads the given tokens as possibly
    noisy, so projecting them back is the usual approximation.
    """

    requires = _REQUIRES
    steps: eqx.AbstractVar[int]
    grid: eqx.AbstractVar[ddiff.TimeGrid]

    def correct(
        self,
        model: ddiff.DiffusionModel,
        x: ddiff.TokenBatch,
        s: jax.Array,
        tau: jax.Array,
        conditioning: ddiff.Conditioning,
        *,
        keys: ddiff.KeyBatch,
    ) -> tuple[ddiff.TokenBatch, jax.Array]:
        """Corrector moves at time s after a predictor step of length tau, sample i's
        randomness from ``keys[i]``; returns the tokens and the network calls made
        (default: none)."""
        return x, jnp.int32(0)

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        calls = start.calls

        def step(carry, inputs):
            x, evals = carry
            t, s, index = inputs
            split = jax.vmap(jax.random.split)(ddiff.step_keys(start.loop_keys, index))
            leap_keys, correct_keys = split[:, 0], split[:, 1]
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            rates = jax.vmap(lambda lm, xi: reverse_rates(process, lm, xi, t))(log_mean, x)
            x = ddiff.apply_fixed(
                conditioning, jax.vmap(_leap, (0, 0, 0, None))(leap_keys, x, rates, t - s)
            )
            x, used = self.correct(model, x, s, t - s, conditioning, keys=correct_keys)
            return (x, evals + calls + used), None

        times = ddiff.time_grid(self.grid, self.steps)
        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), (times[:-1], times[1:], jnp.arange(self.steps))
        )
        log_mean, _ = ddiff.batched_log_mean(model, x, jnp.zeros(()), conditioning)
        x = ddiff.apply_fixed(conditioning, jax.vmap(ddiff.categorical)(start.final_keys, log_mean))
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals + calls)


class TauLeapingSampler(AbstractTauLeapingSampler):
    """Tau-leaping (Campbell et al. sec. 4): every position leaps independently under the
    reverse rates at the start of each step, moving only when exactly one jump is
    proposed there.

    Attributes:
        steps: number of leaps T (network evaluations: T + 1, doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    steps: int = eqx.field(static=True, default=256)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step="tau_leap", reads="mean", times=ddiff.time_grid(self.grid, self.steps), final="mean"
        )


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

    steps: int = eqx.field(static=True, default=256)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")
    corrector_steps: int = eqx.field(static=True, default=2)
    corrector_step_size: float = eqx.field(static=True, default=0.1)
    corrector_entry_time: float = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)
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

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step="tau_leap", reads="mean", times=ddiff.time_grid(self.grid, self.steps),
            final="mean", corrector_steps=self.corrector_steps,
            corrector_size=self.corrector_step_size, corrector_entry=self.corrector_entry_time,
        )

    def correct(self, model, x, s, tau, conditioning, *, keys):
        process = model.process
        calls = ddiff.calls_per_prediction(conditioning)

        def corrector(x, index):
            log_mean, _ = ddiff.batched_log_mean(model, x, s, conditioning)

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
            return ddiff.apply_fixed(conditioning, moved), None

        def run(x):
            x, _ = jax.lax.scan(corrector, x, jnp.arange(self.corrector_steps))
            return x, jnp.int32(self.corrector_steps * calls)

        active = (s > 0) & (s <= self.corrector_entry_time)
        return jax.lax.cond(active, run, lambda x: (x, jnp.int32(0)), x)
