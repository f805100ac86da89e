"""D3PM's discretized Gaussian process for ordinal data (Austin et al. 2021, App. A.2.3)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.d3pm._grid import _grid_problem
from ddiff_plugins.d3pm._schedules import D3PMLinearSchedule, _grid_index, log_matmul


def _total_noise(schedule: ddiff.AbstractSchedule, t: ddiff.Time) -> ddiff.Scalar:
    """-log alpha(t): tabulated exactly for ``d3pm_linear`` (whose alpha near 1 would lose
    the small betas to float32 rounding), from alpha for any other schedule."""
    if isinstance(schedule, D3PMLinearSchedule):
        return schedule.total_noise(t)
    return -jnp.log(schedule.alpha(t))


def gaussian_transition_matrix(beta: float, vocab_size: int) -> np.ndarray:
    """D3PM eq. 8 (App. A.2.3) in float64: off the diagonal
    Q[i, j] = exp(-4 (i-j)^2 / ((K-1)^2 beta)) / sum_{n=-(K-1)}^{K-1} exp(-4 n^2 / ((K-1)^2 beta)),
    the diagonal making rows sum to one. Q is symmetric, hence doubly stochastic, with the
    uniform distribution as its stationary distribution. beta = 0 gives the identity."""
    size = vocab_size
    distance = np.abs(np.arange(size)[:, None] - np.arange(size)[None, :])
    if beta <= 0.0:
        return np.eye(size)
    offsets = np.arange(-(size - 1), size, dtype=np.float64)
    logits = -4.0 * offsets**2 / ((size - 1) ** 2 * beta)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    by_distance = weights[size - 1 :]  # distance 0 .. K-1
    matrix = np.where(distance > 0, by_distance[distance], 0.0)
    matrix[np.diag_indices(size)] = 1.0 - matrix.sum(axis=1)
    return matrix


TABLE_BYTES_PER_ENTRY = 8
"""Each entry of the tables is a float32 logarithm held twice: the NumPy table and the
device array made from it (the few float64 V x V work matrices of the products come on
top: the estimate is a lower bound)."""


class DiscretizedGaussianProcess(ddiff.AbstractTransitionProcess):
    """D3PM's discretized Gaussian process for ordinal data such as pixels (App. A.2.3):
    step i applies Q_i = :func:`gaussian_transition_matrix` (beta_i), the Gaussian's
    variance parameter beta_i = 1 - alpha(i/T) / alpha((i-1)/T) taken from the schedule,
    and q(x_t | x_0) is row x_0 of Qbar_i = Q_1 ... Q_i. The prior is uniform (Q_i is
    doubly stochastic).

    The matrices exist only for the T = ``steps`` grid times: log Q_i and log Qbar_i are
    tabulated when the process is built (float64 products, stored as float32 logarithms
    in :class:`ddiff.Constant`, never trained), (2T + 1) V^2 numbers (0.5 GB for V = 256,
    T = 1000; a few seconds to build), refused before any is allocated when twice their
    bytes exceed the machine's memory (:func:`ddiff.check_table_fits`). Any time is read as the nearest grid time;
    transitions between grid times i < j multiply Q_{i+1} ... Q_j. An objective or
    sampler whose steps do not divide T is refused at load time.

    Attributes:
        schedule: gives the betas through alpha at the grid times.
        steps: T; by default the schedule's own number of steps (``d3pm_linear``).
    """

    provides = frozenset({caps.FACTORIZED, caps.TRANSITIONS})
    schedule: ddiff.AbstractSchedule
    vocab_size: int = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    log_steps: ddiff.Constant
    log_cumulative: ddiff.Constant

    def __init__(self, schedule: ddiff.AbstractSchedule, vocab_size: int, steps: int | None = None):
        if caps.SCALAR not in schedule.capabilities():
            raise ddiff.RecipeError(
                f"the discretized Gaussian process needs a scalar schedule, got {type(schedule).__name__}",
                path="schedule",
            )
        if vocab_size < 2:
            raise ddiff.RecipeError(
                f"the discretized Gaussian process needs at least 2 token values, got {vocab_size}"
            )
        schedule_steps = schedule.steps if isinstance(schedule, D3PMLinearSchedule) else None
        explicit_steps = steps is not None
        if steps is None:
            if schedule_steps is None:
                raise ddiff.RecipeError(
                    f"give the number of steps the transition tables are built for "
                    f"(schedule {type(schedule).__name__} has no grid of its own)",
                    path="steps",
                )
            steps = schedule_steps
        ddiff.check_at_least("steps", steps)
        if schedule_steps is not None and schedule_steps % steps:
            raise ddiff.RecipeError(
                f"steps={steps} does not divide the schedule's {schedule_steps} steps, so the "
                f"grid times i/{steps} fall between the schedule's; use a divisor of {schedule_steps}",
                path="steps",
            )
        given = "steps" if explicit_steps else "schedule.steps"
        ddiff.check_table_fits(
            (2 * steps + 1, vocab_size, vocab_size),
            TABLE_BYTES_PER_ENTRY,
            what=f"building the {2 * steps + 1} transition tables of {vocab_size} x {vocab_size} "
            f"(log Q_i and log Qbar_i for T = {steps} steps)",
            path=given,
            change=f"lower {given} or the data's vocabulary ({vocab_size} values)",
        )
        self.schedule, self.vocab_size, self.steps = schedule, vocab_size, steps
        times = jnp.arange(steps + 1, dtype=jnp.float32) / steps
        noise = np.asarray(jax.vmap(lambda t: _total_noise(schedule, t))(times), np.float64)
        with np.errstate(invalid="ignore"):
            betas = -np.expm1(-(noise[1:] - noise[:-1]))
        betas = np.where(np.isnan(betas), 1.0, np.clip(betas, 0.0, 1.0))  # inf - inf: alpha stays 0
        log_steps = np.empty((steps, vocab_size, vocab_size), np.float32)
        log_cumulative = np.empty((steps + 1, vocab_size, vocab_size), np.float32)
        cumulative = np.eye(vocab_size)
        with np.errstate(divide="ignore"):
            log_cumulative[0] = np.log(cumulative)
            for index, beta in enumerate(betas):
                matrix = gaussian_transition_matrix(beta, vocab_size)
                cumulative = cumulative @ matrix
                log_steps[index] = np.log(matrix)
                log_cumulative[index + 1] = np.log(cumulative)
        self.log_steps = ddiff.Constant(jnp.asarray(log_steps))
        self.log_cumulative = ddiff.Constant(jnp.asarray(log_cumulative))

    @property
    def num_states(self) -> int:
        return self.vocab_size

    def pairing_problem(self, components):
        return _grid_problem(self.steps, components)

    def _cumulative(self, t):
        """log Qbar at the grid time nearest t, (V, V)."""
        return self.log_cumulative.value[_grid_index(t, self.steps)]

    def marginal_probs(self, x0: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        return jnp.exp(self._cumulative(t)[x0])

    def sample_marginal(self, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key) -> ddiff.Tokens:
        return ddiff.categorical(key, self._cumulative(t)[x0])

    def prior_probs(self) -> Float[Array, " states"]:
        return jnp.full((self.vocab_size,), 1.0 / self.vocab_size)

    def sample_prior(self, seq_len: int, *, key: ddiff.Key) -> ddiff.Tokens:
        return jax.random.randint(key, (seq_len,), 0, self.vocab_size)

    def log_marginal_likelihood(self, x_t: ddiff.Tokens, t: ddiff.Time) -> ddiff.LogProbs:
        return self._cumulative(t)[:, x_t].T

    def log_marginal_from_mean(
        self, log_mean: ddiff.LogProbs, t: ddiff.Time
    ) -> ddiff.StateLogProbs:
        """log sum_v mu[v] Qbar_t[v, y] as a matrix product in log space
        (:func:`log_matmul`), exact however small the terms."""
        return log_matmul(log_mean, self._cumulative(t))

    def _log_step_likelihood(self, x_t, s, t):
        """log q(x_t | x_s = j) for every j, from the log tables: the row of x_t in log Q_j
        of the last step (Q is symmetric), then back through the earlier steps in log
        space when s is more than one step before t."""
        first, last = self._steps_between(s, t)
        column = self.log_steps.value[jnp.maximum(last - 1, 0)][x_t]

        def back(offset, column):
            return log_matmul(column, self.log_steps.value[last - 2 - offset])

        return jax.lax.fori_loop(0, jnp.maximum(last - first - 1, 0), back, column)

    def log_posterior(
        self, x_t: ddiff.Tokens, x0: ddiff.Tokens, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateLogProbs:
        return ddiff.log_normalize(self._log_step_likelihood(x_t, s, t) + self._cumulative(s)[x0])

    def log_posterior_from_mean(
        self, x_t: ddiff.Tokens, log_mean: ddiff.LogProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateLogProbs:
        """The core's formula with every factor read from the log tables: the weights
        log mu[v] - log q_t(x_t | v) span hundreds of nats, which a float32 matrix product
        cannot hold, so the product with Qbar_s is a log-space one (:func:`log_matmul`,
        O(V^2) exponentials per position where D3PM does O(V^2) multiply-adds)."""
        likelihood = self.log_marginal_likelihood(x_t, t)
        possible = likelihood > -jnp.inf
        weights = jnp.where(possible, log_mean - jnp.where(possible, likelihood, 0.0), -jnp.inf)
        mixed = log_matmul(weights, self._cumulative(s))
        return ddiff.log_normalize(self._log_step_likelihood(x_t, s, t) + mixed)

    def _steps_between(self, s, t):
        return _grid_index(s, self.steps), _grid_index(t, self.steps)

    def propagate(
        self, probs_s: ddiff.StateProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        first, last = self._steps_between(s, t)

        def body(index, probs):
            return jnp.matmul(
                probs, jnp.exp(self.log_steps.value[index]), precision=jax.lax.Precision.HIGHEST
            )

        return jax.lax.fori_loop(first, last, body, probs_s)

    def transition_probs(self, x_s: ddiff.Tokens, s: ddiff.Time, t: ddiff.Time) -> ddiff.StateProbs:
        return self.propagate(jax.nn.one_hot(x_s, self.vocab_size), s, t)

    def transition_likelihood(
        self, x_t: ddiff.Tokens, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        """Column x_t of Q_{i+1} ... Q_j: the Q's are symmetric, so it is the row of x_t
        pushed through Q_j, ..., Q_{i+1} in reverse order."""
        first, last = self._steps_between(s, t)

        def body(offset, column):
            index = last - 1 - offset
            return jnp.matmul(
                column, jnp.exp(self.log_steps.value[index]), precision=jax.lax.Precision.HIGHEST
            )

        return jax.lax.fori_loop(0, last - first, body, jax.nn.one_hot(x_t, self.vocab_size))


# --------------------------------------------------------------------------- parameterization
