"""D3PM (Austin et al., NeurIPS 2021): discrete-time diffusion with structured transition
matrices, the variational bound L_vb, the hybrid loss L_lambda and ancestral sampling.

Every family is a forward process that owns a schedule alpha with
alpha(i/T) = prod_{j <= i} (1 - beta_j), so beta_i = 1 - alpha(i/T) / alpha((i-1)/T):

- absorbing: the ``masked`` process of the md4 plugin (D3PM App. A.2.2, closed form);
- uniform: the ``uniform`` process of the common plugin (App. A.2.1, closed form);
- discretized Gaussian: :class:`DiscretizedGaussianProcess` here (App. A.2.3), whose
  one-step and cumulative matrices are tabulated for a fixed number of steps.

Time i/T of a T-step model is t = i/T in [0, 1]; x_0 is clean (alpha(0) = 1 for every
schedule here). Everything is computed in log space: no probability is padded by an
epsilon before its logarithm, and a zero probability contributes exactly 0 to a KL term.
"""

import math
from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import ddiff
from ddiff import capabilities as caps

GRID_TOLERANCE = 1e-3
"""A time t with |t T - round(t T)| below this many steps is read as the grid time
round(t T) / T (float32 times i/T are not exact)."""


def log_matmul(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """log(exp(log_a) @ exp(log_b)) for log_a (n, k) and log_b (k, m), exact however small
    the terms: for every output a maximum and a sum of exponentials over k (the maximum
    held constant for the gradient), -inf where every term is -inf. Rows of log_a are
    processed in chunks so that at most ~2^22 terms exist at once."""
    size = log_b.shape[0] * log_b.shape[1]

    def one_row(row):
        terms = row[:, None] + log_b  # (k, m)
        peak = jax.lax.stop_gradient(jnp.max(terms, axis=0))
        finite = jnp.isfinite(peak)
        peak = jnp.where(finite, peak, 0.0)
        total = jnp.sum(jnp.exp(terms - peak[None, :]), axis=0)
        return jnp.where(finite, peak + ddiff.safe_log(total), -jnp.inf)

    chunk = max(1, min(log_a.shape[0], (1 << 22) // size))
    return jax.lax.map(one_row, log_a, batch_size=chunk)


def _grid_index(t: jax.Array, steps: int) -> jax.Array:
    """round(t T) as an int32 in 0..T."""
    return jnp.clip(jnp.round(t * steps), 0, steps).astype(jnp.int32)


# --------------------------------------------------------------------------- schedules


class JSDSchedule(ddiff.AbstractSchedule):
    """beta_i = 1 / (T - i + 1) (Sohl-Dickstein et al. 2015; D3PM sec. 3.2 and App. A.6):
    its product telescopes to alpha(i/T) = 1 - i/T for every T, so alpha(t) = 1 - t
    exactly, from alpha(0) = 1 to alpha(1) = 0. For the absorbing process it is the
    mutual-information schedule (D3PM App. A.7), the schedule of D3PM-absorbing.
    """

    provides = frozenset({caps.SCALAR})

    def alpha(self, t):
        return 1.0 - t

    def alpha_derivative(self, t):
        return -jnp.ones_like(t)


class D3PMCosineSchedule(ddiff.AbstractSchedule):
    """The cosine schedule of D3PM-uniform (Hoogeboom et al. 2021; Nichol & Dhariwal 2021):

        alpha(t) = f(t) / f(0),  f(t) = cos(pi/2 (t + s) / (1 + s))^power,

    so beta_i = 1 - f(i/T) / f((i-1)/T) for any T. D3PM's reference code uses power 1
    (``alpha_bar = cos(...)``), Nichol & Dhariwal power 2. alpha(1) = 0 exactly; D3PM
    clips the last beta at 0.999, leaving alpha(1) ~ 1e-6 (a prior term of ~1e-6 nats).

    Attributes:
        offset: s, which keeps beta_1 from vanishing.
        power: the exponent of the cosine.
    """

    provides = frozenset({caps.SCALAR})
    offset: float = eqx.field(static=True, default=0.008)
    power: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if not self.offset > 0:
            raise ddiff.RecipeError(
                f"offset must be positive, got {self.offset}", path="offset"
            )
        ddiff.check_at_least("power", self.power)

    def _angle(self, t):
        return 0.5 * math.pi * (t + self.offset) / (1.0 + self.offset)

    def alpha(self, t):
        # cos(pi/2) is -4e-8 in float32: clamp so that alpha(1) = 0.
        start = math.cos(0.5 * math.pi * self.offset / (1.0 + self.offset)) ** self.power
        return jnp.maximum(jnp.cos(self._angle(t)), 0.0) ** self.power / start

    def alpha_derivative(self, t):
        start = math.cos(0.5 * math.pi * self.offset / (1.0 + self.offset)) ** self.power
        cosine = jnp.maximum(jnp.cos(self._angle(t)), 0.0)
        slope = 0.5 * math.pi / (1.0 + self.offset)
        return -self.power * cosine ** (self.power - 1.0) * jnp.sin(self._angle(t)) * slope / start


class D3PMLinearSchedule(ddiff.AbstractSchedule):
    """beta_i rising linearly from ``start`` to ``stop`` over T = ``steps`` steps (Ho et
    al. 2020; D3PM-Gauss: 1e-4 to 0.02, T = 1000, App. B.1).

    alpha(i/T) = prod_{j <= i} (1 - beta_j) is exact at the grid times (tabulated in
    float64 when built); between grid times log alpha is linear in t, so the schedule is
    defined, continuous and decreasing on all of [0, 1]. A discrete-time objective or
    sampler whose steps do not divide T is refused at load time (its times would fall
    between grid points).

    Attributes:
        steps: the number of steps T the betas are spread over.
        start: beta_1.
        stop: beta_T.
    """

    provides = frozenset({caps.SCALAR})
    steps: int = eqx.field(static=True)
    start: float = eqx.field(static=True)
    stop: float = eqx.field(static=True)
    log_alpha: ddiff.Constant

    def __init__(self, steps: int = 1000, start: float = 1e-4, stop: float = 0.02):
        ddiff.check_at_least("steps", steps)
        if not 0.0 < start <= stop < 1.0:
            raise ddiff.RecipeError(f"need 0 < start <= stop < 1, got start={start} and stop={stop}")
        self.steps, self.start, self.stop = steps, start, stop
        betas = np.linspace(start, stop, steps, dtype=np.float64)
        log_alpha = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
        self.log_alpha = ddiff.Constant(jnp.asarray(log_alpha, jnp.float32))

    def _position(self, t):
        """t T, snapped to the nearest grid point within :data:`GRID_TOLERANCE`."""
        position = t * self.steps
        nearest = jnp.round(position)
        return jnp.where(jnp.abs(position - nearest) < GRID_TOLERANCE, nearest, position)

    def _interval(self, position):
        left = jnp.clip(jnp.floor(position), 0, self.steps - 1).astype(jnp.int32)
        table = self.log_alpha.value
        return left, table[left], table[left + 1]

    def total_noise(self, t: ddiff.Time) -> ddiff.Scalar:
        """-log alpha(t), interpolated linearly between the tabulated grid times."""
        position = self._position(t)
        left, low, high = self._interval(position)
        return -(low + (position - left) * (high - low))

    def alpha(self, t):
        return jnp.exp(-self.total_noise(t))

    def alpha_derivative(self, t):
        _, low, high = self._interval(self._position(t))
        return self.alpha(t) * self.steps * (high - low)

    def pairing_problem(self, components):
        return _grid_problem(self.steps, components)


def _information_fraction(keep: jax.Array, probs: jax.Array) -> jax.Array:
    """I(x_t; x_0) / H(x_0) for uniform transitions with keep probability a (D3PM eq. 17):
    q(x_t = y | x_0 = v) = a [y = v] + c, c = (1 - a)/V, and x_0 ~ probs."""
    size = probs.shape[0]
    fresh = (1.0 - keep) / size

    def entropy_terms(p):
        return jnp.where(p > 0, -p * ddiff.safe_log(p), 0.0)

    marginal = keep * probs + fresh
    entropy_t = jnp.sum(entropy_terms(marginal))
    conditional = entropy_terms(keep + fresh) + (size - 1) * entropy_terms(fresh)
    entropy_0 = jnp.sum(entropy_terms(probs))
    return (entropy_t - conditional) / entropy_0


@jax.custom_jvp
def _keep_for_information(fraction: jax.Array, probs: jax.Array) -> jax.Array:
    """The keep probability a in [0, 1] with I(x_t; x_0) / H(x_0) = ``fraction``, by
    bisection (the fraction increases with a, from 0 at a = 0 to 1 at a = 1)."""

    def body(_, bounds):
        low, high = bounds
        middle = 0.5 * (low + high)
        above = _information_fraction(middle, probs) > fraction
        return jnp.where(above, low, middle), jnp.where(above, middle, high)

    low, high = jax.lax.fori_loop(0, 48, body, (jnp.zeros_like(fraction), jnp.ones_like(fraction)))
    return 0.5 * (low + high)


@_keep_for_information.defjvp
def _keep_for_information_jvp(primals, tangents):
    """Implicit differentiation: da = dfraction / (d fraction / d a)."""
    fraction, probs = primals
    d_fraction, _ = tangents
    keep = _keep_for_information(fraction, probs)
    slope = jax.grad(_information_fraction)(keep, probs)
    return keep, d_fraction / slope


class MutualInformationSchedule(ddiff.AbstractSchedule):
    """D3PM's mutual-information schedule (App. A.7): alpha is chosen so that the
    information x_t keeps about x_0 falls linearly, I(x_t; x_0) = (1 - t) H(x_0), with
    x_0 distributed as the data's marginal over token values.

    - ``transitions: absorbing``: the fraction kept is exactly alpha for any marginal, so
      alpha(t) = 1 - t, the schedule ``jsd`` (App. A.7).
    - ``transitions: uniform``: alpha(t) solves the equation numerically (bisection in
      float32 to its resolution, derivative by implicit differentiation) for the given
      marginal: ``marginal`` (unigram frequencies, as D3PM estimated from its training
      set) or, when omitted, the uniform distribution over the V values.

    alpha is defined for every t, so the schedule works with any number of steps. It is
    refused with a process other than the one its ``transitions`` names (masked for
    absorbing; the discretized Gaussian family, for which D3PM used the linear schedule,
    is not covered).

    Attributes:
        transitions: ``uniform`` or ``absorbing``.
        marginal: V probabilities of the token values, or null for uniform.
    """

    provides = frozenset({caps.SCALAR})
    vocab_size: int = eqx.field(static=True)
    transitions: Literal["uniform", "absorbing"] = eqx.field(static=True, default="uniform")
    marginal: tuple[float, ...] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.vocab_size < 2:
            raise ddiff.RecipeError(
                f"the mutual-information schedule needs at least 2 token values, got {self.vocab_size}"
            )
        if self.marginal is not None:
            probs = np.asarray(self.marginal, np.float64)
            if (
                probs.shape != (self.vocab_size,)
                or np.any(probs < 0)
                or abs(probs.sum() - 1.0) > 1e-3
            ):
                raise ddiff.RecipeError(
                    f"marginal must hold {self.vocab_size} non-negative probabilities summing to 1 "
                    f"(got {len(self.marginal)} summing to {probs.sum():.6g})",
                    path="marginal",
                )
            if np.count_nonzero(probs) < 2:
                raise ddiff.RecipeError(
                    "marginal must give mass to at least 2 values (else H(x_0) = 0)",
                    path="marginal",
                )

    def _probs(self) -> jax.Array:
        if self.marginal is None:
            return jnp.full((self.vocab_size,), 1.0 / self.vocab_size)
        probs = jnp.asarray(self.marginal, jnp.float32)
        return probs / jnp.sum(probs)

    def alpha(self, t):
        if self.transitions == "absorbing":
            return 1.0 - t
        return _keep_for_information(1.0 - t, self._probs())

    def pairing_problem(self, components):
        if "process" not in components:
            return None
        process_name, process = components["process"]
        masked = caps.MASKED in process.capabilities()
        if isinstance(process, DiscretizedGaussianProcess):
            return (
                f"the mutual-information schedule is computed for uniform and absorbing "
                f"transitions, not for process {process_name!r}; use d3pm_linear as D3PM does"
            )
        if masked != (self.transitions == "absorbing"):
            wanted = "absorbing" if masked else "uniform"
            return (
                f"its transitions: {self.transitions} do not match process {process_name!r}; "
                f"set process.schedule.transitions: {wanted}"
            )
        return None


# --------------------------------------------------------------------------- the Gaussian process


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


class DiscretizedGaussianProcess(ddiff.AbstractTransitionProcess):
    """D3PM's discretized Gaussian process for ordinal data such as pixels (App. A.2.3):
    step i applies Q_i = :func:`gaussian_transition_matrix` (beta_i), the Gaussian's
    variance parameter beta_i = 1 - alpha(i/T) / alpha((i-1)/T) taken from the schedule,
    and q(x_t | x_0) is row x_0 of Qbar_i = Q_1 ... Q_i. The prior is uniform (Q_i is
    doubly stochastic).

    The matrices exist only for the T = ``steps`` grid times: log Q_i and log Qbar_i are
    tabulated when the process is built (float64 products, stored as float32 logarithms
    in :class:`ddiff.Constant`, never trained), (2T + 1) V^2 numbers (0.5 GB for V = 256,
    T = 1000; a few seconds to build). Any time is read as the nearest grid time;
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

    def marginal_probs(self, x0, t):
        return jnp.exp(self._cumulative(t)[x0])

    def sample_marginal(self, x0, t, *, key):
        return ddiff.categorical(key, self._cumulative(t)[x0])

    def prior_probs(self):
        return jnp.full((self.vocab_size,), 1.0 / self.vocab_size)

    def sample_prior(self, seq_len, *, key):
        return jax.random.randint(key, (seq_len,), 0, self.vocab_size)

    def log_marginal_likelihood(self, x_t, t):
        return self._cumulative(t)[:, x_t].T

    def log_marginal_from_mean(self, log_mean, t):
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

    def log_posterior(self, x_t, x0, s, t):
        return ddiff.log_normalize(self._log_step_likelihood(x_t, s, t) + self._cumulative(s)[x0])

    def log_posterior_from_mean(self, x_t, log_mean, s, t):
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

    def propagate(self, probs_s, s, t):
        first, last = self._steps_between(s, t)

        def body(index, probs):
            return jnp.matmul(
                probs, jnp.exp(self.log_steps.value[index]), precision=jax.lax.Precision.HIGHEST
            )

        return jax.lax.fori_loop(first, last, body, probs_s)

    def transition_probs(self, x_s, s, t):
        return self.propagate(jax.nn.one_hot(x_s, self.vocab_size), s, t)

    def transition_likelihood(self, x_t, s, t):
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


class DiscretizedLogisticParameterization(ddiff.AbstractMeanParameterization):
    """D3PM's truncated discretized logistic for p(x_0 | x_t) over ordinal values (App. A.8
    and B.1; "D3PM Gauss + logistic"). The network gives two channels per position, a log
    scale log s and a shift m'; the location is mu = tanh(x_t / (V-1) * 2 - 1 + m') in
    [-1, 1], where the values v sit at c_v = 2v/(V-1) - 1, and

        p(x_0 = v | x_t) proportional to sigma((c_v - mu + w) / s') - sigma((c_v - mu - w) / s'),

    with half-width w = 1/(V-1) and 1/s' = exp(2 - log s) (D3PM's offset, so that log s = 0
    is a moderate width), renormalised over the V values (the truncation). Each bin is
    computed in log space as log sigma(u) + log sigma(-l) + log(1 - e^{-(u-l)}), which has
    no cancellation at either tail.
    """

    def output_channels(self, process):
        return 2

    def log_mean(self, output, x_t, t, process):
        size = process.vocab_size
        log_scale, shift = output[:, 0], output[:, 1]
        location = jnp.tanh(2.0 * x_t / (size - 1) - 1.0 + shift)
        half_width = 1.0 / (size - 1)
        log_inverse_scale = 2.0 - log_scale
        inverse_scale = jnp.exp(log_inverse_scale)[:, None]
        offset = jnp.linspace(-1.0, 1.0, size)[None, :] - location[:, None]
        upper = inverse_scale * (offset + half_width)
        lower = inverse_scale * (offset - half_width)
        width = inverse_scale * 2.0 * half_width
        log_width = (log_inverse_scale + math.log(2.0 * half_width))[:, None]
        # log(1 - e^{-w}); for w < 1e-6 its expansion log w - w/2, which stays finite
        # where w itself underflows.
        tiny = width < 1e-6
        log_mass = jnp.where(
            tiny, log_width - 0.5 * width, jnp.log(-jnp.expm1(-jnp.where(tiny, 1.0, width)))
        )
        log_bins = jax.nn.log_sigmoid(upper) + jax.nn.log_sigmoid(-lower) + log_mass
        return jax.nn.log_softmax(log_bins, axis=-1)


# --------------------------------------------------------------------------- the bound


def categorical_kl(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    """KL(q || p) summed over the last axis and the positions, from log-probabilities:
    entries with q = 0 contribute exactly 0 (also to the gradient), entries with q > 0
    and p = 0 make it +inf."""
    support = log_q > -jnp.inf
    safe_q = jnp.where(support, log_q, 0.0)
    safe_p = jnp.where(support, log_p, 0.0)
    return jnp.sum(jnp.where(support, jnp.exp(safe_q) * (safe_q - safe_p), 0.0))


def _clean_log_likelihood(log_mean: jax.Array, x0: ddiff.Tokens) -> jax.Array:
    """sum_n log mu[n, x_0^n]."""
    return jnp.sum(jnp.take_along_axis(log_mean, x0[:, None], axis=-1))


class D3PMBound(ddiff.AbstractDiscreteTimeObjective):
    """The D3PM variational bound (Austin et al. 2021, eq. 1) of the T-step model with
    the x0-parameterization (eq. 4), and the hybrid loss L_lambda (eq. 5):

        L_vb = KL(q(x_T | x_0) || p(x_T))
               + sum_{i=2}^{T} E_q KL(q(x_{i-1} | x_i, x_0) || p_theta(x_{i-1} | x_i))
               - E_q log p_theta(x_0 | x_1),

    with x_i at time i/T and p_theta(x_0 | x_1) = mu_theta(x_1, 1/T). The reverse step
    p_theta(x_{i-1} | x_i) averages the true posterior over x_0 ~ mu_theta(x_i, i/T) (the
    process's ``log_posterior_from_mean``), so the exact denoiser gives each position's
    exact step. D3PM's code weights x_0 by the joint q(x_{i-1}, x_i | x_0) instead, which
    is the same for the absorbing process but not for the uniform or Gaussian ones, where
    its bound with the exact denoiser does not approach H(p) as T grows.

    The sum over i is estimated with one step per example, drawn antithetically
    (:meth:`ddiff.AbstractDiscreteTimeObjective.sample_times`), times T; the prior term is
    exact. Every term is
    computed in log space (:func:`categorical_kl`). For the absorbing process the i-th
    term equals MD4's discrete-time term (MD4 App. D).

    ``nelbo`` is the bound; ``loss`` adds hybrid_weight * T * CE, the cross-entropy
    CE = -sum_n log mu_theta(x_i, i/T)[n, x_0^n] at the same draw. D3PM's code adds
    lambda CE to a single sampled term of L_vb (one T-th of the bound), so the factor T
    makes ``hybrid_weight`` the lambda of D3PM's settings (0.001 for CIFAR-10, 0.01 for
    text8). Metrics: ``diffusion`` (the KL terms), ``reconstruction`` (the i = 1 term),
    ``prior``, ``cross_entropy``; all in nats per sequence.

    Attributes:
        steps: the number of steps T.
        hybrid_weight: lambda (0 trains on the bound alone).
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.TRANSITIONS}),
    }
    steps: int = eqx.field(static=True, default=1000)
    hybrid_weight: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        ddiff.check_at_least("hybrid_weight", self.hybrid_weight, 0)

    def bound_form(self):
        """L_vb of the T-step model; its i = 1 term is the decoder -log mu(x_1, 1/T)[x_0]."""
        return ddiff.BoundForm(steps=self.steps, decoder="model")

    def step_term(
        self,
        process: ddiff.AbstractTransitionProcess,
        x0: ddiff.Tokens,
        x_t: ddiff.Tokens,
        log_mean: ddiff.LogProbs,
        s: ddiff.Time,
        t: ddiff.Time,
    ) -> ddiff.Scalar:
        """The term of L_vb for the step from t back to s = t - 1/T, for one draw x_t:
        KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)) summed over positions, or at the first
        step (s = 0) -log p_theta(x_0 | x_t) = -sum_n log mu[n, x_0^n]."""
        log_q = process.log_posterior(x_t, x0, s, t)
        log_p = process.log_posterior_from_mean(x_t, log_mean, s, t)
        return jnp.where(s <= 0, -_clean_log_likelihood(log_mean, x0), categorical_kl(log_q, log_p))

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        noise_key, network_key = jax.random.split(key)
        x_t = process.sample_marginal(x0, t, key=noise_key)
        log_mean = model.log_mean(x_t, t, label=label, key=network_key if train else None)
        first = _grid_index(t, self.steps) <= 1
        s = jnp.where(first, 0.0, t - 1.0 / self.steps)
        term = self.steps * self.step_term(process, x0, x_t, log_mean, s, t)
        prior = process.prior_kl(x0)
        nelbo = term + prior
        cross_entropy = -_clean_log_likelihood(log_mean, x0)
        return ddiff.ObjectiveTerms(
            loss=nelbo + self.hybrid_weight * self.steps * cross_entropy,
            nelbo=nelbo,
            metrics={
                "diffusion": jnp.where(first, 0.0, term),
                "reconstruction": jnp.where(first, term, 0.0),
                "prior": prior,
                "cross_entropy": cross_entropy,
            },
        )


# --------------------------------------------------------------------------- the sampler


class D3PMAncestralSampler(ddiff.AbstractSampler):
    """Ancestral sampling of the T-step model (D3PM sec. 3.3): x_T from the prior, then
    x_{i-1} ~ p_theta(x_{i-1} | x_i) (the process's ``log_posterior_from_mean`` at
    s = (i-1)/T, t = i/T) for i = T..2, and x_0 ~ mu_theta(x_1, 1/T); every draw exact
    (:func:`ddiff.categorical`), one ``lax.scan``. Labels and classifier-free guidance
    go through :func:`ddiff.batched_log_mean`; given positions (infilling) are written
    into x after the prior draw and after every step, which is exact for the absorbing
    process and an approximation for the others (a given token in x_t reads as
    possibly noisy). D3PM's code takes the most probable x_0 at the last step; this
    draws it, so that the output follows the model.

    With fewer steps than the model was trained with, steps are skipped evenly (the
    x0-parameterization allows it, D3PM sec. 3.3); on a process or schedule tabulated
    for T steps, ``steps`` must divide T.

    Attributes:
        steps: reverse steps (network evaluations: ``steps``, doubled under guidance).
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.TRANSITIONS}),
    }
    steps: int = eqx.field(static=True, default=1000)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def reverse_chain(self):
        """Steps from i/T to (i-1)/T for i = T..2, then x_0 ~ mu(x, 1/T) at every position."""
        times = jnp.arange(self.steps, 0, -1, dtype=jnp.int32).astype(jnp.float32) / self.steps
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=tuple(float(t) for t in times.tolist()),
            final="mean",
        )

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        x, calls = start.tokens, start.calls

        def step(x, index):
            t = index.astype(jnp.float32) / self.steps
            s = (index - 1).astype(jnp.float32) / self.steps
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            log_probs = jax.vmap(lambda x_t, lm: process.log_posterior_from_mean(x_t, lm, s, t))(
                x, log_mean
            )
            drawn = jax.vmap(ddiff.categorical)(ddiff.step_keys(start.loop_keys, index), log_probs)
            return ddiff.apply_fixed(conditioning, drawn), None

        if self.steps > 1:
            x, _ = jax.lax.scan(step, x, jnp.arange(self.steps, 1, -1, dtype=jnp.int32))
        log_mean, _ = ddiff.batched_log_mean(
            model, x, jnp.asarray(1.0 / self.steps, jnp.float32), conditioning
        )
        x = ddiff.apply_fixed(conditioning, jax.vmap(ddiff.categorical)(start.final_keys, log_mean))
        return ddiff.SampleOutput(tokens=x, num_function_evals=jnp.int32(self.steps * calls))


# --------------------------------------------------------------------------- step-count checks


def _steps_used(slot: str, component: Any) -> int | None:
    """The number of steps of a grid that ``component`` steps on, if any: a discrete-time
    objective (capability ``discrete_time``, argument ``steps``) or this module's sampler."""
    if slot == "objective" and caps.DISCRETE_TIME in component.capabilities():
        return component.steps
    if slot == "sampler" and isinstance(component, D3PMAncestralSampler):
        return component.steps
    return None


def _grid_problem(grid: int, components: Mapping[str, tuple[str, Any]]) -> str | None:
    """Refuse an objective or sampler whose grid i/steps is not part of the grid i/``grid``
    on which a tabulated process or schedule is defined: its steps must divide ``grid``."""
    for slot in ("objective", "sampler"):
        if slot not in components:
            continue
        name, component = components[slot]
        steps = _steps_used(slot, component)
        if steps is not None and grid % steps:
            return (
                f"it is defined on a grid of {grid} steps, but {slot} {name!r} takes "
                f"steps={steps}, which does not divide {grid}; set {slot}.steps to {grid} "
                f"or a divisor of it"
            )
    return None


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("schedule", "jsd", JSDSchedule)
    registry.register("schedule", "d3pm_cosine", D3PMCosineSchedule)
    registry.register("schedule", "d3pm_linear", D3PMLinearSchedule)
    registry.register("schedule", "mutual_information", MutualInformationSchedule)
    registry.register("process", "discretized_gaussian", DiscretizedGaussianProcess)
    registry.register(
        "parameterization", "discretized_logistic", DiscretizedLogisticParameterization
    )
    registry.register("objective", "d3pm_vb", D3PMBound)
    registry.register("sampler", "d3pm_ancestral", D3PMAncestralSampler)
