"""SEDD (Lou et al., ICML 2024): score entropy discrete diffusion.

The network estimates concentration ratios s[n, y] ~ p_t(x with x^n = y) / p_t(x) of a
factorized CTMC with forward rates R_t; the time reversal moves position n from x^n to y
at rate R_t(y -> x^n) s[n, y] (their eq. 3). SEDD's absorbing graph is the ``masked``
process and its uniform graph the ``uniform`` process, with the ``loglinear`` and
``geometric`` schedules (alpha_t = exp(-sigma_bar(t))).

Notation: V token values, S states (V + 1 with the mask at index V), q_t(y | v) the
marginal of one position, r_t = alpha_t / (1 - alpha_t).
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

# --------------------------------------------------------------------------- schedules


class AbstractNoiseSchedule(ddiff.AbstractSchedule):
    """A schedule written in SEDD's terms (Lou et al. 2024): the total noise
    sigma_bar(t), with alpha_t = exp(-sigma_bar(t)), and the noise rate
    sigma(t) = d sigma_bar / dt = -alpha'_t / alpha_t, both in closed form.

    Any schedule has them (:func:`total_noise` and :func:`noise_rate` compute them from
    alpha); a schedule defined by its noise subclasses this to give them exactly where
    alpha rounds (sigma_bar near 0, where alpha is within float32 of 1).
    """

    @abc.abstractmethod
    def total_noise(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """sigma_bar(t) = -log alpha(t)."""

    @abc.abstractmethod
    def noise_rate(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """sigma(t) = d sigma_bar / dt = -alpha'(t) / alpha(t)."""


def total_noise(schedule: ddiff.AbstractSchedule, t: ddiff.Time) -> ddiff.ScheduleValue:
    """SEDD's total noise sigma_bar(t) = -log alpha(t) of any schedule (the closed form of
    an :class:`AbstractNoiseSchedule`)."""
    if isinstance(schedule, AbstractNoiseSchedule):
        return schedule.total_noise(t)
    return -jnp.log(schedule.alpha(t))


def noise_rate(schedule: ddiff.AbstractSchedule, t: ddiff.Time) -> ddiff.ScheduleValue:
    """SEDD's noise rate sigma(t) = -alpha'(t) / alpha(t) of any schedule (the closed form
    of an :class:`AbstractNoiseSchedule`)."""
    if isinstance(schedule, AbstractNoiseSchedule):
        return schedule.noise_rate(t)
    return -schedule.alpha_derivative(t) / schedule.alpha(t)


def _check_unit_interval(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ddiff.RecipeError(f"{name} must be in (0, 1), got {value}", path=name)


class GeometricSchedule(AbstractNoiseSchedule):
    """SEDD's geometric noise (Lou et al. 2024, sec. 5 and their noise_lib; MD4 Table 1,
    geometric): total noise sigma_bar(t) = sigma_min^(1-t) sigma_max^t and
    alpha_t = exp(-sigma_bar(t)), with no further clipping: sigma_min > 0 keeps
    alpha_0 = exp(-sigma_min) below 1 and sigma_max keeps alpha_1 = exp(-sigma_max) above 0.
    The noise rate is sigma(t) = sigma_bar(t) log(sigma_max / sigma_min).

    Attributes:
        sigma_min: total noise at t = 0 (SEDD's 1e-4).
        sigma_max: total noise at t = 1 (SEDD's 20).
    """

    provides = frozenset({caps.SCALAR})
    sigma_min: float = eqx.field(static=True, default=1e-4)
    sigma_max: float = eqx.field(static=True, default=20.0)

    def __check_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ddiff.RecipeError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}"
            )

    def alpha(self, t):
        return jnp.exp(-self.total_noise(t))

    def alpha_derivative(self, t):
        return -self.alpha(t) * self.noise_rate(t)

    def total_noise(self, t):
        return jnp.exp((1.0 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max))

    def noise_rate(self, t):
        return self.total_noise(t) * math.log(self.sigma_max / self.sigma_min)


class LogLinearSchedule(AbstractNoiseSchedule):
    """SEDD's log-linear noise, the schedule of its absorbing graph (Lou et al. 2024,
    their noise_lib): total noise sigma_bar(tau) = -log(1 - (1 - eps) tau), so
    alpha = 1 - (1 - eps) tau falls linearly from 1 to eps. At tau = 0 alpha is 1 and the
    score r = alpha / (1 - alpha) is infinite, so SEDD trains on tau in [t_min, 1] (their
    ``sampling_eps``); ddiff's time runs over that interval, tau = t_min + (1 - t_min) t,
    which leaves alpha_0 = 1 - (1 - eps) t_min < 1 and a finite reconstruction term.
    The noise rate is sigma(t) = (1 - t_min)(1 - eps) / (1 - (1 - eps) tau).

    Attributes:
        eps: alpha at t = 1 (SEDD's 1e-3).
        t_min: SEDD's smallest training time, where ddiff's t = 0 lies (SEDD's 1e-3).
    """

    provides = frozenset({caps.SCALAR})
    eps: float = eqx.field(static=True, default=1e-3)
    t_min: float = eqx.field(static=True, default=1e-3)

    def __check_init__(self):
        _check_unit_interval(self.eps, "eps")
        _check_unit_interval(self.t_min, "t_min")

    def _tau(self, t):
        return self.t_min + (1.0 - self.t_min) * t

    def alpha(self, t):
        # 1 - (1 - eps) tau, written without the cancellation near tau = 1.
        return self.eps + (1.0 - self.eps) * (1.0 - self.t_min) * (1.0 - t)

    def alpha_derivative(self, t):
        return -(1.0 - self.eps) * (1.0 - self.t_min) * jnp.ones_like(t)

    def total_noise(self, t):
        return -jnp.log1p(-(1.0 - self.eps) * self._tau(t))

    def noise_rate(self, t):
        return (1.0 - self.t_min) * (1.0 - self.eps) / self.alpha(t)


# --------------------------------------------------------------------------- parameterization


class ScoreParameterization(ddiff.AbstractScoreParameterization):
    """SEDD's score network (their model/transformer.py): one output channel per state,
    read as log s, with the current state's entry set to log 1 = 0.

    With ``absorbing_scale`` on a masked process the output is shifted by
    log r_t - log V per clean value (SEDD's ``scale_by_sigma``:
    log s = output - log(e^sigma_bar - 1) - log V), so that an output of zero is the score
    r_t / V of a uniform denoiser and the network learns a time-independent quantity.
    SEDD scales only the absorbing graph; on any other process the output is read as
    log s unchanged, as SEDD reads it on the uniform graph.

    Attributes:
        absorbing_scale: add log r_t - log V on a masked process.
    """

    absorbing_scale: bool = eqx.field(static=True, default=True)

    def output_channels(self, process):
        return process.num_states

    def log_score(self, output, x_t, t, process):
        log_score = output
        if self.absorbing_scale and caps.MASKED in process.capabilities():
            noise = jnp.broadcast_to(total_noise(process.schedule, t), (process.vocab_size,))
            shift = -jnp.log(jnp.expm1(noise)) - jnp.log(process.vocab_size)
            padding = jnp.zeros((process.num_states - process.vocab_size,))
            log_score = log_score + jnp.concatenate([shift, padding])[None, :]
        current = jax.nn.one_hot(x_t, process.num_states, dtype=bool)
        return jnp.where(current, 0.0, log_score)


def score_entropy(
    process: ddiff.AbstractRateProcess,
    log_score: ddiff.StateLogProbs,
    x0: ddiff.Tokens,
    x_t: ddiff.Tokens,
    t: ddiff.Time,
) -> ddiff.Scalar:
    """The denoising score entropy integrand at (x_0, x_t, t) (Lou et al. 2024, eq. 9 and
    Thm. 3.6), summed over positions:

        sum_n sum_{y != x_t^n} R_t(y -> x_t^n) [ s_y - a_y log s_y + K(a_y) ],

    with a_y = q_t(y | x_0^n) / q_t(x_t^n | x_0^n) and K(a) = a (log a - 1). Each bracket is
    written as the generalised KL divergence s - a + a (log a - log s) >= 0, which is 0
    exactly at s = a and avoids the cancellation of the r log r terms. O(S) per position.
    """
    num_states = process.num_states
    weights = process.incoming_rates(x_t, t)
    probs = process.marginal_probs(x0, t)
    current_prob = jnp.take_along_axis(probs, x_t[:, None], axis=-1)
    possible = probs > 0
    ratio = probs / current_prob
    log_ratio = jnp.log(jnp.where(possible, probs, 1.0)) - jnp.log(current_prob)
    active = (weights > 0) & ~jax.nn.one_hot(x_t, num_states, dtype=bool)
    log_score = jnp.where(active, log_score, 0.0)
    surprise = jnp.where(possible, ratio * (log_ratio - log_score), 0.0)
    divergence = jnp.exp(log_score) - ratio + surprise
    return jnp.sum(jnp.where(active, weights * divergence, 0.0))


class ScoreEntropy(ddiff.AbstractObjective):
    """Diffusion-weighted denoising score entropy, a bound on -log p_theta(x_0) (Lou et
    al. 2024, Thm. 3.6), made complete for ddiff's time interval:

        L = int_0^1 E_{x_t ~ q_t(. | x_0)} [score entropy integrand] dt
            + reconstruction + KL(q_1(. | x_0) || p_1),

    with one antithetic time per example. The reconstruction term is the process's
    :meth:`~ddiff.AbstractForwardProcess.reconstruction_nll` (the noise left at t = 0,
    where alpha_0 < 1, removed by a data-free decoder), so with the exact score the bound
    is tight up to the prior mismatch and with any score it is at least H(p). Generic over
    processes with forward rates: absorbing (``masked``) and uniform graphs alike. For the
    masked process with s = r_t mu each position's term equals the MD4 integrand, sample by
    sample (docs/sedd.md).
    Reported in nats per sequence (the trainer divides by D log 2 for bits per token).
    ``loss`` is the bound (SEDD's training loss) unless a ``weighting`` says otherwise
    (:class:`ddiff.AbstractWeighting`); its cross-entropy reads the clean-value marginals
    from the scores by Tweedie's formula (``process.log_mean_from_score``).

    Attributes:
        weighting: the training weighting (None: the bound).
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = {
        "parameterization": frozenset({caps.SCORE}),
        "process": frozenset({caps.RATES, caps.FACTORIZED}),
    }
    weighting: ddiff.AbstractWeighting | None = None

    def pairing_problem(self, components):
        if self.weighting is None or not self.weighting.cross_entropy:
            return None
        if _has_posterior(components["process"][1], components["parameterization"][1]):
            return None
        return (
            "its weighting's cross_entropy needs the model's clean-token posterior, which a "
            "score network gives (by Tweedie's formula) only on the masked process; use the "
            "x0 parameterization or cross_entropy: 0"
        )

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        parameterization = model.parameterization
        noise_key, network_key = jax.random.split(key)
        x_t = process.sample_marginal(x0, t, key=noise_key)
        output = model.network_output(x_t, t, label=label, key=network_key if train else None)
        log_score = parameterization.log_score(output, x_t, t, process)
        terms = ddiff.bound_terms(model, x0, score_entropy(process, log_score, x0, x_t, t))
        cross_entropy = None
        if _has_posterior(process, parameterization):
            if caps.MEAN in parameterization.capabilities():
                log_mean = parameterization.log_mean(output, x_t, t, process)
            else:
                log_mean = process.log_mean_from_score(log_score, x_t, t)
            cross_entropy = -jnp.sum(jnp.take_along_axis(log_mean, x0[:, None], axis=-1))
        return ddiff.weighted_terms(
            self.weighting, terms, process=process, t=t, cross_entropy=cross_entropy
        )


def _has_posterior(process: ddiff.AbstractForwardProcess, parameterization: ddiff.AbstractParameterization) -> bool:
    """Whether the model gives a clean-token posterior with mass on every value: a mean
    parameterization, or scores on the masked process (whose Tweedie mean is a softmax; on
    other processes it clips negative values and can give x_0 no mass)."""
    return caps.MEAN in parameterization.capabilities() or caps.MASKED in process.capabilities()


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
            step=self.step_rule, reads="score", times=ddiff.grid_times(self.grid, self.steps),
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


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("schedule", "geometric", GeometricSchedule)
    registry.register("schedule", "loglinear", LogLinearSchedule)
    registry.register("parameterization", "score", ScoreParameterization)
    registry.register("objective", "score_entropy", ScoreEntropy)
    registry.register("sampler", "euler", EulerSampler)
    registry.register("sampler", "analytic", AnalyticSampler)
