"""SEDD's samplers: Euler steps of the reverse CTMC and the analytic (Tweedie) step."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

# --------------------------------------------------------------------------- samplers


class AbstractScoreSampler(ddiff.AbstractSampler):
    """Reverse sampling with scores on a time grid 1 = t_0 > ... > t_T = 0
    (:func:`ddiff.time_grid`), as SEDD's predictor loop (their sampling.py), jitted as one
    ``lax.scan``: the reverse process starts from the process prior, every step draws all
    positions independently from :meth:`step_probs` (one batched score per step, labels
    and classifier-free guidance through :func:`ddiff.batched_log_score`), and given
    positions are projected back after every step (SEDD's infilling). A final denoising
    step at t = 0 draws every position from the Tweedie mean of the scores
    (:meth:`~ddiff.AbstractForwardProcess.log_mean_from_score`, SEDD's noise removal),
    which also resolves positions still masked. Network evaluations: steps + 1 (doubled
    under guidance).
    """

    steps: eqx.AbstractVar[int]
    grid: eqx.AbstractVar[ddiff.TimeGrid]

    @property
    @abc.abstractmethod
    def step_rule(self) -> str:
        """The :class:`ddiff.ReverseChain` rule of :meth:`step_probs`."""

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step=self.step_rule, reads="score", times=ddiff.time_grid(self.grid, self.steps),
            final="tweedie",
        )

    @abc.abstractmethod
    def step_probs(
        self,
        process: ddiff.AbstractForwardProcess,
        x: ddiff.Tokens,
        log_score: ddiff.StateLogProbs,
        s: ddiff.Time,
        t: ddiff.Time,
    ) -> ddiff.StateProbs:
        """Unnormalised probabilities of each position's state at time s < t, given the
        state x at t and its log scores (one example)."""

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)

        def step(carry, inputs):
            x, evals = carry
            t, s, index = inputs
            log_score, calls = ddiff.batched_log_score(model, x, t, conditioning)
            probs = jax.vmap(lambda x, log_score: self.step_probs(process, x, log_score, s, t))(
                x, log_score
            )
            stuck = jnp.sum(probs, axis=-1, keepdims=True) <= 0
            probs = jnp.where(stuck, jax.nn.one_hot(x, process.num_states), probs)
            drawn = jax.vmap(ddiff.categorical_from_probs)(ddiff.step_keys(start.loop_keys, index), probs)
            x = ddiff.apply_fixed(conditioning, drawn)
            return (x, evals + calls), None

        times = ddiff.time_grid(self.grid, self.steps)
        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), (times[:-1], times[1:], jnp.arange(self.steps))
        )
        end = times[-1]
        log_score, calls = ddiff.batched_log_score(model, x, end, conditioning)
        log_mean = jax.vmap(lambda log_score, x: process.log_mean_from_score(log_score, x, end))(
            log_score, x
        )
        x = ddiff.apply_fixed(conditioning, jax.vmap(ddiff.categorical)(start.final_keys, log_mean))
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals + calls)


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
    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    @property
    def step_rule(self):
        return "euler"

    def step_probs(self, process, x, log_score, s, t):
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
    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    @property
    def step_rule(self):
        return "tweedie"

    def step_probs(self, process, x, log_score, s, t):
        staggered = process.unpropagate(jnp.exp(log_score), s, t)
        return jnp.maximum(staggered, 0.0) * process.transition_likelihood(x, s, t)
