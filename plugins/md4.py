"""MD4 (Shi et al., NeurIPS 2024): masked diffusion with a weighted cross-entropy ELBO.

Notation: V real tokens, mask m = V, alpha_t the probability that a token is still clean.
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

EPS = 1e-4
"""The paper's clipping: alpha_t = (1 - 2 eps) a(t) + eps keeps alpha in [eps, 1 - eps]."""


class AbstractClippedSchedule(ddiff.AbstractSchedule):
    """A schedule alpha_t = (1 - 2 eps) a(t) + eps built from a shape a(t) that falls from
    a(0) ~ 1 to a(1) ~ 0 (MD4 sec. 4 and its reference code): the clipping keeps alpha in
    [eps, 1 - eps], so the ELBO weight alpha'_t / (1 - alpha_t) stays finite at t = 0 and
    the reconstruction term D (1 - alpha_0) log V is O(D eps log V).
    """

    provides = frozenset({caps.SCALAR})
    eps: eqx.AbstractVar[float]

    @abc.abstractmethod
    def shape(self, t: ddiff.Time) -> ddiff.Scalar:
        """The unclipped shape a(t)."""

    @abc.abstractmethod
    def shape_derivative(self, t: ddiff.Time) -> ddiff.Scalar:
        """d a / dt (non-positive)."""

    def alpha(self, t):
        return (1.0 - 2.0 * self.eps) * self.shape(t) + self.eps

    def alpha_derivative(self, t):
        return (1.0 - 2.0 * self.eps) * self.shape_derivative(t)


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ddiff.RecipeError(f"eps must be in [0, 0.5), got {eps}", path="eps")


class LinearSchedule(AbstractClippedSchedule):
    """a(t) = 1 - t, so alpha_t = (1 - 2 eps)(1 - t) + eps (MD4 Table 1, linear)."""

    eps: float = eqx.field(static=True, default=EPS)

    def __check_init__(self):
        _check_eps(self.eps)

    def shape(self, t):
        return 1.0 - t

    def shape_derivative(self, t):
        return -jnp.ones_like(t)


class CosineSchedule(AbstractClippedSchedule):
    """a(t) = 1 - cos(pi/2 (1 - t)) (MD4 Table 1, cosine): slow masking near t = 0."""

    eps: float = eqx.field(static=True, default=EPS)

    def __check_init__(self):
        _check_eps(self.eps)

    def shape(self, t):
        return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))

    def shape_derivative(self, t):
        return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))


class PolySchedule(AbstractClippedSchedule):
    """a(t) = 1 - t^k (MD4 Table 1, polynomial; "poly3" in the reference code is k = 3).

    Attributes:
        power: the exponent k > 0 (k = 1 is the linear schedule).
        eps: the clipping.
    """

    power: float = eqx.field(static=True, default=3.0)
    eps: float = eqx.field(static=True, default=EPS)

    def __check_init__(self):
        _check_eps(self.eps)
        if not self.power > 0:
            raise ddiff.RecipeError(
                f"power must be positive, got {self.power}", path="power"
            )

    def shape(self, t):
        return 1.0 - t**self.power

    def shape_derivative(self, t):
        return -self.power * t ** (self.power - 1.0)


class MaskedProcess(ddiff.AbstractTransitionProcess, ddiff.AbstractRateProcess):
    """The absorbing process: q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) onehot(m)
    independently per position (MD4 eq. 1). With a per-value schedule (GenMD4) the token
    of value v survives with probability alpha_t[v].

    The prior p(x_1) matches q(x_1 | x_0) factor by factor as closely as a data-free
    prior can: the mask with probability 1 - abar_1, otherwise a uniform token, where
    abar_1 is alpha_1 averaged over values; its KL to q is the exact prior term.
    """

    schedule: ddiff.AbstractSchedule
    vocab_size: int = eqx.field(static=True)

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def capabilities(self):
        schedule_caps = self.schedule.capabilities()
        kind = caps.STATE_DEPENDENT if caps.PER_VALUE in schedule_caps else caps.SCALAR_SCHEDULE
        return frozenset({caps.FACTORIZED, caps.MASKED, caps.TRANSITIONS, caps.RATES, kind})

    def survival(self, x: ddiff.Tokens, t: ddiff.Time) -> jax.Array:
        """alpha_t of each position's value (1 for the mask, which never changes)."""
        alpha = self.schedule.alpha(t)
        if alpha.ndim == 0:
            return jnp.where(x == self.mask_id, 1.0, alpha)
        return jnp.where(x == self.mask_id, 1.0, alpha[jnp.minimum(x, self.vocab_size - 1)])

    def marginal_probs(self, x0, t):
        alpha = self.survival(x0, t)
        clean = jax.nn.one_hot(x0, self.num_states) * alpha[:, None]
        return clean.at[:, self.mask_id].add(1.0 - alpha)

    def sample_marginal(self, x0, t, *, key):
        keep = jax.random.uniform(key, x0.shape) < self.survival(x0, t)
        return jnp.where(keep, x0, self.mask_id)

    def prior_probs(self):
        alpha_1 = jnp.mean(self.schedule.alpha(jnp.ones(())))
        probs = jnp.full((self.num_states,), alpha_1 / self.vocab_size)
        return probs.at[self.mask_id].set(1.0 - alpha_1)

    def transition_probs(self, x_s, s, t):
        ratio = self.survival(x_s, t) / self.survival(x_s, s)
        stay = jax.nn.one_hot(x_s, self.num_states) * ratio[:, None]
        return stay.at[:, self.mask_id].add(1.0 - ratio)

    def _value_ratio(self, s, t):
        values = jnp.arange(self.vocab_size)
        return self.survival(values, t) / self.survival(values, s)

    def transition_likelihood(self, x_t, s, t):
        ratio = self._value_ratio(s, t)
        is_mask = (x_t == self.mask_id)[:, None]
        real = jnp.where(
            is_mask, 1.0 - ratio[None, :], jax.nn.one_hot(x_t, self.vocab_size) * ratio[None, :]
        )
        return jnp.concatenate([real, is_mask.astype(real.dtype)], axis=-1)

    def propagate(self, probs_s, s, t):
        ratio = self._value_ratio(s, t)
        real = probs_s[:, : self.vocab_size] * ratio
        masked = probs_s[:, self.mask_id] + jnp.sum(probs_s[:, : self.vocab_size] * (1.0 - ratio), -1)
        return jnp.concatenate([real, masked[:, None]], axis=-1)

    def _value_hazards(self, t):
        """The masking rate -alpha'_t[v] / alpha_t[v] of every clean value v, shape (V,)."""
        alpha = self.schedule.alpha(t)
        hazard = -self.schedule.alpha_derivative(t) / alpha
        return jnp.broadcast_to(hazard, (self.vocab_size,))

    def forward_rates(self, x, t):
        hazard = self._value_hazards(t)[jnp.minimum(x, self.vocab_size - 1)]
        hazard = jnp.where(x == self.mask_id, 0.0, hazard)
        rates = -hazard[:, None] * jax.nn.one_hot(x, self.num_states)
        return rates.at[:, self.mask_id].add(hazard)

    def state_exit_rates(self, t):
        """A clean value v leaves at its masking rate -alpha'_t[v]/alpha_t[v]; the mask never leaves."""
        return jnp.concatenate([self._value_hazards(t), jnp.zeros((1,))])

    def incoming_rates(self, x, t):
        """Into the mask: R_t(v -> m) = -alpha'_t[v]/alpha_t[v] from every clean v (the mask
        never leaves, R_t(m -> m) = 0). Into a clean v: only its own diagonal, -hazard[v]."""
        hazard = self._value_hazards(t)
        masked = (x == self.mask_id)[:, None]
        into_mask = jnp.concatenate([hazard, jnp.zeros((1,))])[None, :]
        own = -hazard[jnp.minimum(x, self.vocab_size - 1)][:, None] * jax.nn.one_hot(x, self.num_states)
        return jnp.where(masked, into_mask, own)

    def log_marginal_from_mean(self, log_mean, t):
        """Closed form, O(V) per position: a clean value y keeps its mass with probability
        alpha_t[y], so log q_t(y | mu) = log alpha_t[y] + log mu[y], and the mask collects
        the rest, log sum_v mu[v] (1 - alpha_t[v])."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_gone = jnp.where(alpha < 1, jnp.log1p(-jnp.where(alpha < 1, alpha, 0.0)), -jnp.inf)
        clean = log_mean + ddiff.safe_log(alpha)[None, :]
        masked = ddiff.log_sum_exp(log_mean + log_gone[None, :])
        return jnp.concatenate([clean, masked], axis=-1)

    def log_marginal_likelihood(self, x_t, t):
        """Closed form: a masked token has likelihood 1 - alpha_t[v] under every value v;
        a clean token u only under v = u, with likelihood alpha_t[u]."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_gone = jnp.where(alpha < 1, jnp.log1p(-jnp.where(alpha < 1, alpha, 0.0)), -jnp.inf)
        same = jax.nn.one_hot(x_t, self.vocab_size, dtype=bool)
        clean = jnp.where(same, ddiff.safe_log(alpha)[None, :], -jnp.inf)
        return jnp.where((x_t == self.mask_id)[:, None], log_gone[None, :], clean)

    def log_score_from_mean(self, log_mean, x_t, t):
        """Closed form of the absorbing process (Lou et al. 2024, sec. 3): at a masked
        position s[y] = alpha_t[y] / (1 - alpha_t[y]) mu[y] for clean y (= r mu for a
        scalar schedule) and s[m] = 1; at a clean position v only x_0 = v is possible, so
        s[v] = 1, s[m] = (1 - alpha_t[v]) / alpha_t[v] and 0 elsewhere."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_ratio = jnp.log(alpha) - jnp.log1p(-alpha)
        masked_row = jnp.concatenate(
            [log_mean + log_ratio[None, :], jnp.zeros((x_t.shape[0], 1))], axis=-1
        )
        value = jnp.minimum(x_t, self.vocab_size - 1)
        clean_row = jnp.where(jax.nn.one_hot(x_t, self.num_states, dtype=bool), 0.0, -jnp.inf)
        clean_row = clean_row.at[:, self.mask_id].set(-log_ratio[value])
        return jnp.where((x_t == self.mask_id)[:, None], masked_row, clean_row)


    def log_mean_from_score(self, log_score, x_t, t):
        """Closed form (the inverse of :meth:`log_score_from_mean`): at a masked position
        mu[v] proportional to s[v] (1 - alpha_t[v]) / alpha_t[v], the Tweedie denoiser
        SEDD's absorbing graph uses; a clean position keeps its token."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_ratio = jnp.log(alpha) - jnp.log1p(-alpha)
        masked = jax.nn.log_softmax(log_score[:, : self.vocab_size] - log_ratio[None, :], axis=-1)
        carried = jnp.where(
            jax.nn.one_hot(x_t, self.vocab_size, dtype=bool), 0.0, -jnp.inf
        )
        return jnp.where((x_t == self.mask_id)[:, None], masked, carried)

    def unpropagate(self, values, s, t):
        """Closed form: Q_{s->t}^{-1} is the transition from t back to s, keep a clean v
        with alpha_s[v] / alpha_t[v] and send the rest (a negative weight) to the mask, so
        it is :meth:`propagate` with the times exchanged."""
        return self.propagate(values, t, s)

    def reconstruction_nll(self, x0):
        """Closed form: z is x_0^n itself (which only x_0^n produces, d = 1) or the mask,
        from which d(v) is proportional to 1 - alpha_0[v]; for a scalar schedule this is
        MD4's D (1 - alpha_0) log V."""
        masking = 1.0 - jnp.broadcast_to(self.schedule.alpha(jnp.zeros(())), (self.vocab_size,))
        own = masking[x0]
        log_decoder = jnp.log(jnp.where(own > 0, own, 1.0)) - jnp.log(jnp.where(own > 0, jnp.sum(masking), 1.0))
        return -jnp.sum(jnp.where(own > 0, own * log_decoder, 0.0))


class MeanParameterization(ddiff.AbstractMeanParameterization, ddiff.AbstractScoreParameterization):
    """mu_theta = softmax of the network's V logits at masked positions; an unmasked
    position carries its token over (one-hot), and no mass is put on the mask
    (MDLM's "SUBS", MD4 sec. 3). Needs a masked process (use ``x0`` for others).

    The mean also reads as a score (Lou et al. 2024, sec. 3): s = alpha_t / (1 - alpha_t)
    mu at masked positions (:meth:`ddiff.AbstractForwardProcess.log_score_from_mean`), so
    a network trained with the MD4 ELBO can be evaluated under score entropy and sampled
    with SEDD's samplers.
    """

    provides = frozenset({caps.MEAN, caps.SCORE})
    requires = {"process": frozenset({caps.MASKED})}

    def output_channels(self, process):
        return process.vocab_size

    def log_mean(self, output, x_t, t, process):
        masked = (x_t == process.vocab_size)[:, None]
        carried = jnp.where(
            jax.nn.one_hot(x_t, process.vocab_size, dtype=bool), 0.0, -jnp.inf
        )
        return jnp.where(masked, jax.nn.log_softmax(output, axis=-1), carried)

    def log_score(self, output, x_t, t, process):
        return process.log_score_from_mean(self.log_mean(output, x_t, t, process), x_t, t)


def _masked_terms(model, x0, t, key, label, train) -> tuple[jax.Array, jax.Array]:
    """Draw x_t ~ q(x_t | x_0) and return sum over masked n of log mu_theta(x_t, t)[n, x_0^n]
    and the same sum over every position (minus the cross-entropy of a weighting)."""
    process = model.process
    noise_key, network_key = jax.random.split(key)
    x_t = process.sample_marginal(x0, t, key=noise_key)
    log_mean = model.log_mean(x_t, t, label=label, key=network_key if train else None)
    picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(x_t == process.mask_id, picked, 0.0)), jnp.sum(picked)


_MD4_REQUIRES = {
    "parameterization": frozenset({caps.MEAN}),
    "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
}


def elbo_weight(schedule: ddiff.AbstractSchedule, t: ddiff.Time) -> ddiff.ScheduleValue:
    """The masked-diffusion ELBO weight alpha'(t) / (1 - alpha(t)) (non-positive; MD4
    eq. 5), per token value for a per-value schedule."""
    return schedule.alpha_derivative(t) / (1.0 - schedule.alpha(t))


class MD4ContinuousELBO(ddiff.AbstractObjective):
    """The continuous-time negative ELBO (MD4 eq. 5):

        L = int_0^1 alpha'_t / (1 - alpha_t) E_q[ sum_{n: x_t^n = m} log mu_theta(x_t, t)[n, x_0^n] ] dt
            + reconstruction + prior,

    estimated with one antithetic time per example. Reported in nats per sequence (the
    trainer divides by D log 2 for bits per token, which is bits per dimension for
    images). The reconstruction term is D (1 - alpha_0) log V; the prior term is the
    exact KL(q(x_1 | x_0) || p(x_1)). ``loss`` is the bound (MD4's training loss) unless
    a ``weighting`` says otherwise (:class:`ddiff.AbstractWeighting`).

    Attributes:
        weighting: the training weighting (None: the bound).
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = _MD4_REQUIRES
    weighting: ddiff.AbstractWeighting | None = None

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        masked, every = _masked_terms(model, x0, t, key, label, train)
        terms = ddiff.bound_terms(model, x0, elbo_weight(model.process.schedule, t) * masked)
        return ddiff.weighted_terms(
            self.weighting, terms, process=model.process, t=t, cross_entropy=-every
        )


class MD4DiscreteELBO(ddiff.AbstractDiscreteTimeObjective):
    """The negative ELBO of the T-step discrete-time model (MD4 sec. 4, eq. 4): with
    s(i) = (i-1)/T and t(i) = i/T,

        L_T = T E_{i ~ U{1..T}} E_q[ (alpha_s - alpha_t)/(1 - alpha_t)
                                    * sum_{n: x_t^n = m} -log mu_theta(x_t, t)[n, x_0^n] ]
              + reconstruction + prior.

    Each step's term is KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)) for the masked process.
    The step index is drawn antithetically across the batch
    (:meth:`ddiff.AbstractDiscreteTimeObjective.sample_times`). L_T decreases towards the
    continuous-time bound as T grows.

    Attributes:
        steps: the number of steps T.
    """

    requires = _MD4_REQUIRES
    steps: int = eqx.field(static=True, default=1000)

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        schedule = model.process.schedule
        s = jnp.maximum(t - 1.0 / self.steps, 0.0)
        alpha_s, alpha_t = schedule.alpha(s), schedule.alpha(t)
        weight = self.steps * (alpha_s - alpha_t) / (1.0 - alpha_t)
        log_likelihood, _ = _masked_terms(model, x0, t, key, label, train)
        return ddiff.bound_terms(model, x0, -weight * log_likelihood)


# --------------------------------------------------------------------------- samplers


def _ancestral_logits(log_mean, alpha_s, alpha_t):
    """Log-probabilities over V+1 outcomes of a masked position from t to s (MD4 Alg. 2):
    value v with (alpha_s - alpha_t)/(1 - alpha_t) mu[v], the mask (index V) with
    (1 - alpha_s)/(1 - alpha_t)."""
    log_unmask = jnp.log(jnp.maximum(alpha_s - alpha_t, 0.0)) - jnp.log1p(-alpha_t)
    log_stay = jnp.log1p(-alpha_s) - jnp.log1p(-alpha_t)
    stay = jnp.broadcast_to(log_stay, (*log_mean.shape[:-1], 1))
    return jnp.concatenate([log_unmask + log_mean, stay], axis=-1)


def nucleus(log_mean: jax.Array, top_p: float) -> jax.Array:
    """Restrict each row of log-probabilities to its nucleus (Holtzman et al. 2020): the
    most probable values whose mass reaches ``top_p`` (a value is kept when the mass of the
    values more probable than it is below ``top_p``), renormalised; the rest get -inf."""
    order = jnp.argsort(-log_mean, axis=-1)
    sorted_probs = jnp.take_along_axis(jnp.exp(log_mean), order, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        (*jnp.indices(order.shape)[:-1], order)
    ].set(keep_sorted)
    return jax.nn.log_softmax(jnp.where(keep, log_mean, -jnp.inf), axis=-1)


class AbstractGridSampler(ddiff.AbstractSampler):
    """Reverse sampling of the masked process on a time grid 1 = t_0 > ... > t_T = 0
    (``uniform`` or ``cosine``, :func:`ddiff.time_grid`), one batched prediction
    mu_theta(x_t, t) per step, jitted as one ``lax.scan``. The reverse process starts from
    all-mask (:func:`ddiff.initial_tokens`); positions still masked after the last step are
    drawn from mu_theta(x_0, 0). Given positions (infilling) are set at the start and after every
    step; labels and classifier-free guidance go through :func:`ddiff.batched_log_mean`.

    Concrete samplers choose the draw (``draw``), a filter of mu (``filter_mean``) and
    whether a prediction is reused while no position changes (``caches``).
    """

    requires = _MD4_REQUIRES
    steps: eqx.AbstractVar[int]
    grid: eqx.AbstractVar[ddiff.TimeGrid]

    @property
    def caches(self) -> bool:
        """Whether a prediction is reused while the batch is unchanged."""
        return False

    def reverse_chain(self):
        """MD4 Alg. 2 on the grid, masked positions drawn from mu(x, 0) at the end (with
        caching, the same chain for a network that ignores t)."""
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=ddiff.grid_times(self.grid, self.steps),
            final="masked_mean",
        )

    def filter_mean(self, log_mean: ddiff.LogProbs) -> ddiff.LogProbs:
        """The distribution over clean values actually drawn from (default: mu itself)."""
        return log_mean

    def draw(
        self,
        key: ddiff.Key,
        log_mean: ddiff.LogProbs,
        alpha_s: ddiff.Scalar,
        alpha_t: ddiff.Scalar,
    ) -> ddiff.Tokens:
        """New value (V = stays masked) of each position, were it masked at t (MD4 Alg. 2:
        one categorical over V+1 outcomes, drawn exactly)."""
        return ddiff.categorical(key, _ancestral_logits(log_mean, alpha_s, alpha_t))

    def sample(self, model, *, keys, seq_len, conditioning):
        if self.caches and caps.TIME_INDEPENDENT not in model.network.capabilities():
            raise ddiff.IncompatibleComponentsError(
                f"sampler {type(self).__name__} reuses network outputs across times, which "
                f"is exact only for a network that ignores t, but {type(model.network).__name__} "
                f"is time conditioned; set network.time_conditioned: false or use sampler "
                f"'ancestral'",
                path="sampler",
            )
        process = model.process
        schedule = process.schedule
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        x, calls = start.tokens, start.calls

        def fresh(x, t):
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            return jax.vmap(self.filter_mean)(log_mean)

        def predict(x, t, cache):
            if not self.caches:
                return fresh(x, t), cache, jnp.int32(calls)
            last_x, last = cache
            changed = jnp.any(x != last_x)
            log_mean = jax.lax.cond(changed, fresh, lambda x, t: last, x, t)
            return log_mean, (x, log_mean), changed.astype(jnp.int32) * calls

        def step(carry, inputs):
            x, cache, evals = carry
            t, s, index = inputs
            log_mean, cache, used = predict(x, t, cache)
            alpha_s, alpha_t = schedule.alpha(s), schedule.alpha(t)
            draws = jax.vmap(lambda k, lm: self.draw(k, lm, alpha_s, alpha_t))(
                ddiff.step_keys(start.loop_keys, index), log_mean
            )
            x = ddiff.apply_fixed(conditioning, jnp.where(x == mask_id, draws, x))
            return (x, cache, evals + used), None

        times = ddiff.time_grid(self.grid, self.steps)
        cache = (jnp.full_like(x, -1), jnp.zeros((*x.shape, process.vocab_size))) if self.caches else None
        (x, cache, evals), _ = jax.lax.scan(
            step, (x, cache, jnp.int32(0)), (times[:-1], times[1:], jnp.arange(self.steps))
        )

        def decode(x, cache):
            log_mean, _, used = predict(x, jnp.zeros(()), cache)
            drawn = jax.vmap(ddiff.categorical)(start.final_keys, log_mean)
            return ddiff.apply_fixed(conditioning, jnp.where(x == mask_id, drawn, x)), used

        x, used = jax.lax.cond(
            jnp.any(ddiff.still_masked(conditioning, x, mask_id)),
            decode,
            lambda x, cache: (x, jnp.int32(0)),
            x,
            cache,
        )
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals + used)


class AncestralSampler(AbstractGridSampler):
    """Ancestral sampling (MD4 Alg. 2): from t to s a masked position becomes a draw from
    Cat((alpha_s - alpha_t)/(1 - alpha_t) mu + (1 - alpha_s)/(1 - alpha_t) onehot(m)),
    drawn exactly (:func:`ddiff.categorical`).

    Attributes:
        steps: number of reverse steps T (network evaluations: T, or T+1 when a
            position is still masked at t = 0; doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)


class TopPSampler(AbstractGridSampler):
    """Ancestral sampling from the nucleus of mu (MD4's ``topp`` sampler): at each step mu is
    restricted to its most probable values with mass ``top_p`` and renormalised, then
    Alg. 2 is applied. ``top_p = 1`` is ancestral sampling.

    Attributes:
        steps: number of reverse steps T.
        grid: ``uniform`` or ``cosine`` time grid.
        top_p: nucleus mass in (0, 1].
    """

    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")
    top_p: float = eqx.field(static=True, default=0.98)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)
        if not 0.0 < self.top_p <= 1.0:
            raise ddiff.RecipeError(
                f"top_p must be in (0, 1], got {self.top_p}", path="top_p"
            )

    def filter_mean(self, log_mean):
        return nucleus(log_mean, self.top_p)

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=ddiff.grid_times(self.grid, self.steps),
            final="masked_mean", top_p=self.top_p,
        )


class MeanSampler(AbstractGridSampler):
    """Ancestral sampling in two draws (MD4's ``mean`` sampler, App. G): draw a clean
    value x_0^n ~ mu for every position, then reveal it with probability
    (alpha_s - alpha_t)/(1 - alpha_t). Equal in law to Alg. 2; both draws are exact.

    Attributes:
        steps: number of reverse steps T.
        grid: ``uniform`` or ``cosine`` time grid.
    """

    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def draw(self, key, log_mean, alpha_s, alpha_t):
        value_key, reveal_key = jax.random.split(key)
        values = ddiff.categorical(value_key, log_mean)
        unmask = jnp.maximum(alpha_s - alpha_t, 0.0) / (1.0 - alpha_t)
        reveal_logits = jnp.stack([jnp.log(unmask), jnp.log1p(-unmask)])
        reveal = ddiff.categorical(reveal_key, jnp.broadcast_to(reveal_logits, (*values.shape, 2)))
        return jnp.where(reveal == 0, values, log_mean.shape[-1])


class CachedSampler(AbstractGridSampler):
    """Ancestral sampling that calls the network only when some position of the batch
    changed since its last call, reusing the previous prediction otherwise (Zheng et al.
    2024; MD4 sec. 4). Exact for a network that ignores t, where an unchanged input means
    an unchanged output; refused for a time-conditioned network. With many steps the
    number of network evaluations is bounded by the number of distinct states visited
    (at most D + 1 for one sequence), not by ``steps``.

    Attributes:
        steps: number of reverse steps T.
        grid: ``uniform`` or ``cosine`` time grid.
    """

    requires = {**_MD4_REQUIRES, "network": frozenset({caps.TIME_INDEPENDENT})}
    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    @property
    def caches(self):
        return True



class FirstHittingSampler(ddiff.AbstractSampler):
    """First-hitting sampling (Zheng et al. 2024): instead of stepping on a grid, draw the
    time of the next unmasking directly. With m masked positions at time t, the next one
    unmasks at tau with 1 - alpha_tau = (1 - alpha_t) U^(1/m), U ~ U(0, 1) (each masked
    position unmasks independently with P(still masked at s | masked at t) =
    (1 - alpha_s)/(1 - alpha_t)); a uniformly chosen masked position then takes a value
    drawn from mu_theta(x, tau). Each network call unmasks one token, so the sampler is
    exact for the continuous-time reverse process and makes one call per token.

    The variant ``tokens_per_call = k > 1`` unmasks the next k positions to hit with one
    call at the first hitting time (their values drawn independently from the same mu),
    then moves to the k-th hitting time: ceil(m / k) calls, exact only when the k tokens
    are conditionally independent. Times are drawn, not taken from a grid.

    Attributes:
        tokens_per_call: positions unmasked per network call.
    """

    requires = _MD4_REQUIRES
    tokens_per_call: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        ddiff.check_at_least("tokens_per_call", self.tokens_per_call)

    def reverse_chain(self):
        """The reverse CTMC, positions still masked at t = 0 drawn one at a time; with
        ``tokens_per_call`` > 1 no exact chain (the k tokens of a call are drawn
        independently)."""
        if self.tokens_per_call > 1:
            return None
        return ddiff.ReverseChain(
            step="continuous", reads="mean", times=(1.0, 0.0), final="sequential"
        )

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        schedule = process.schedule
        mask_id = process.mask_id
        k = min(self.tokens_per_call, seq_len)
        num_samples = keys.shape[0]
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        x, calls = start.tokens, start.calls
        alpha_0, alpha_1 = schedule.alpha(jnp.zeros(())), schedule.alpha(jnp.ones(()))

        def body(state):
            x, t, evals, index = state
            draw_keys = jax.vmap(lambda key: jax.random.split(key, 3))(
                ddiff.step_keys(start.loop_keys, index)
            )
            time_keys, position_keys, value_keys = draw_keys[:, 0], draw_keys[:, 1], draw_keys[:, 2]
            masked = ddiff.still_masked(conditioning, x, mask_id)
            count = jnp.sum(masked, axis=-1)
            # log (1 - alpha) drops by E_j / (m - j) at the j-th next hitting time.
            remaining = count[:, None] - jnp.arange(k)[None, :]
            decrements = jnp.where(
                remaining > 0,
                jax.vmap(lambda key: ddiff.standard_exponential(key, (k,)))(time_keys)
                / jnp.maximum(remaining, 1),
                0.0,
            )
            log_survivors = jnp.log1p(-jax.vmap(schedule.alpha)(t))[:, None] - jnp.cumsum(
                decrements, axis=-1
            )
            hit_alpha = jnp.clip(-jnp.expm1(log_survivors), alpha_1, alpha_0)
            hit_times = ddiff.time_of_alpha(schedule, hit_alpha)
            log_mean, _ = ddiff.batched_log_mean(model, x, hit_times[:, 0], conditioning)
            noise = jax.vmap(lambda key: ddiff.gumbel(key, (seq_len,)))(position_keys)
            priorities = jnp.where(masked, noise, -jnp.inf)
            _, chosen_positions = jax.lax.top_k(priorities, k)
            chosen = jnp.zeros_like(masked).at[
                jnp.arange(num_samples)[:, None], chosen_positions
            ].set(True) & masked
            drawn = jax.vmap(ddiff.categorical)(value_keys, log_mean)
            x = ddiff.apply_fixed(conditioning, jnp.where(chosen, drawn, x))
            t = jnp.where(count > 0, hit_times[:, -1], t)
            return x, t, evals + calls, index + 1

        x, _, evals, _ = jax.lax.while_loop(
            lambda state: jnp.any(ddiff.still_masked(conditioning, state[0], mask_id)),
            body,
            (x, jnp.ones((num_samples,)), jnp.int32(0), jnp.int32(0)),
        )
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("schedule", "linear", LinearSchedule)
    registry.register("schedule", "cosine", CosineSchedule)
    registry.register("schedule", "poly", PolySchedule)
    registry.register("process", "masked", MaskedProcess)
    registry.register("parameterization", "mean", MeanParameterization)
    registry.register("objective", "md4_elbo", MD4ContinuousELBO)
    registry.register("objective", "md4_discrete_elbo", MD4DiscreteELBO)
    registry.register("sampler", "ancestral", AncestralSampler)
    registry.register("sampler", "top_p", TopPSampler)
    registry.register("sampler", "mean", MeanSampler)
    registry.register("sampler", "cached", CachedSampler)
    registry.register("sampler", "first_hitting", FirstHittingSampler)
