"""GenMD4 (Shi et al., NeurIPS 2024, "state-dependent masking schedules"): masked diffusion with a learnable
state-dependent masking schedule, its ELBO with a leave-one-out REINFORCE gradient for
the schedule, and an ancestral sampler for per-value schedules.

Notation: V real tokens, mask m = V; a token of value v is still clean at time t with
probability alpha_t[v]. The forward process is the ``masked`` process of the MD4 plugin
built on a per-value schedule (it then provides ``state_dependent``).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps

EPS = 1e-4
"""alpha_1[v] = eps: the reference code's value."""

T1 = 1e-3
"""The ELBO integrates over t in [t1, 1]; the reference code's t1."""


def _inverse_softplus(power: jax.Array) -> jax.Array:
    return jnp.log(jnp.expm1(power))


class LearnablePolySchedule(ddiff.AbstractSchedule):
    """The GenMD4 polynomial schedule alpha_t[v] = 1 - (1 - eps) t^{w_v}, with one power
    w_v = softplus(phi_v) per token value, phi learnable (the MD4 paper's GenMD4 and
    its reference code). alpha_0 = 1 and alpha_1 = eps for every value; the ELBO weight has
    the closed form alpha'_t[v] / (1 - alpha_t[v]) = -w_v / t.

    Attributes:
        phi: the learnable parameters, shape (V,).
        vocab_size: V (from the data).
        eps: 1 - alpha_1.

    Arguments:
        initial_power: every w_v at initialisation (the reference's ``power_init``, 1:
            the linear schedule).
        initial_powers: one initial power per value instead (a list of V positive
            numbers), e.g. to start from a learned schedule.
    """

    provides = frozenset({caps.PER_VALUE})
    phi: Float[Array, " vocab"]
    vocab_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self,
        vocab_size: int,
        initial_power: float = 1.0,
        initial_powers: tuple[float, ...] | None = None,
        eps: float = EPS,
    ):
        if initial_powers is None:
            powers = (initial_power,) * vocab_size
            where = "initial_power"
        else:
            powers = tuple(initial_powers)
            where = "initial_powers"
            if len(powers) != vocab_size:
                raise ddiff.RecipeError(
                    f"give one power per token value: {vocab_size} numbers, got {len(powers)}",
                    path=where,
                )
        if not all(power > 0 for power in powers):
            raise ddiff.RecipeError(f"powers must be positive, got {min(powers)}", path=where)
        self.phi = _inverse_softplus(jnp.asarray(powers, jnp.float32))
        self.vocab_size = vocab_size
        self.eps = eps

    def __check_init__(self):
        if not 0.0 <= self.eps < 1.0:
            raise ddiff.RecipeError(
                f"eps must be in [0, 1), got {self.eps}", path="eps"
            )

    def powers(self) -> Float[Array, " vocab"]:
        """w = softplus(phi), one power per token value."""
        return jax.nn.softplus(self.phi)

    def _log_time(self, t):
        return jnp.log(jnp.where(t > 0, t, 1.0))

    def _time_power(self, t):
        """t^w per value, 0 at t = 0 (with finite gradients there)."""
        return jnp.where(t > 0, jnp.exp(self.powers() * self._log_time(t)), 0.0)

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * self._time_power(t)

    def alpha_derivative(self, t):
        w = self.powers()
        return -(1.0 - self.eps) * w * jnp.power(t, w - 1.0)

    def elbo_weight(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """The ELBO weight alpha'_t[v] / (1 - alpha_t[v]) in closed form, -w_v / t."""
        return -self.powers() / t

    def log_mask_probability(self, t):
        log_time = jnp.where(t > 0, self._log_time(t), -jnp.inf)
        return jnp.log1p(-self.eps) + self.powers() * log_time


# --------------------------------------------------------------------------- objective


def _log_pattern_probability(masked: jax.Array, log_mask: jax.Array) -> jax.Array:
    """log q(x_t | x_0) of a masking pattern: sum over positions of log(1 - alpha_t[x_0^n])
    where masked, log alpha_t[x_0^n] elsewhere; ``log_mask`` is log(1 - alpha_t[x_0^n])."""
    keep_input = jnp.where(masked, -1.0, log_mask)
    log_keep = jnp.log(-jnp.expm1(keep_input))
    return jnp.sum(jnp.where(masked, log_mask, log_keep))


def genmd4_integrand(
    log_mean: ddiff.LogProbs, x0: ddiff.Tokens, masked: ddiff.PositionMask, weight: jax.Array
) -> ddiff.Scalar:
    """The GenMD4 ELBO integrand at one time (the MD4 paper's GenMD4 bound): with weight[v] =
    alpha'_t[v] / (1 - alpha_t[v]) (non-positive),

        sum over masked n of  weight . [ (log mu[n, x_0^n] + 1) onehot(x_0^n) - mu[n] ]
        = sum over masked n of  weight[x_0^n] (log mu[n, x_0^n] + 1) - sum_v weight[v] mu[n, v],

    a sum of KL-rate terms between the true reverse rates into value v,
    -weight[x_0] onehot(x_0), and the model's, -weight[v] mu[n, v]: non-negative. With
    one weight for every value it is MD4's weight * sum log mu[n, x_0^n]."""
    picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
    mean = jnp.exp(log_mean)
    per_position = weight[x0] * (picked + 1.0) - mean @ weight
    return jnp.sum(jnp.where(masked, per_position, 0.0))


def reconstruction(schedule: ddiff.AbstractSchedule, x0: ddiff.Tokens, t1: jax.Array) -> ddiff.Scalar:
    """The reconstruction term at t1, E_q[-log p(x_0 | x_t1)] with the reference's decoder:
    a clean token is kept, a masked one is decoded as v with probability proportional to
    1 - alpha_t1[v] (the posterior of the mask under a uniform prior over values):

        sum_n (1 - alpha_t1[x_0^n]) (logsumexp_v log(1 - alpha_t1[v]) - log(1 - alpha_t1[x_0^n]))."""
    log_mask = schedule.log_mask_probability(t1)
    own = log_mask[x0]
    return jnp.sum(jnp.exp(own) * (jax.nn.logsumexp(log_mask) - own))


def elbo_weight(schedule: ddiff.AbstractSchedule, t: ddiff.Time) -> ddiff.ScheduleValue:
    """The ELBO weight alpha'_t[v] / (1 - alpha_t[v]) per token value (non-positive): the
    closed form of :class:`LearnablePolySchedule`, computed from alpha for any other
    schedule."""
    if isinstance(schedule, LearnablePolySchedule):
        return schedule.elbo_weight(t)
    return schedule.alpha_derivative(t) / (1.0 - schedule.alpha(t))


class GenMD4ELBO(ddiff.AbstractObjective):
    """The GenMD4 negative ELBO (the MD4 paper's state-dependent bound) and its surrogate
    loss.

    A time u ~ U(0, 1) (antithetic across the batch) is mapped to t = t1 + (1 - t1) u, and
    two masked sequences x_t^1, x_t^2 ~ q(x_t | x_0) are drawn at that t. With f_k the
    integrand (:func:`genmd4_integrand`) of draw k times (1 - t1),

        nelbo = (f_1 + f_2) / 2 + reconstruction(t1) + KL(q(x_1 | x_0) || p(x_1)),

    an unbiased estimate of the bound (the integral over [t1, 1] plus the decoder at t1
    and the prior term). The schedule's parameters also shape the distribution the
    draws come from, so the loss adds the leave-one-out REINFORCE term (the reference's
    RLOO with two draws)

        loss = nelbo + (1/2) stop_gradient(f_1 - f_2) (log q(x_t^1 | x_0) - log q(x_t^2 | x_0)),

    whose gradient with respect to the schedule is an unbiased estimate of the ELBO's
    (pathwise part through the weights, plus score-function part with the other draw as
    baseline); log q depends only on the schedule, so the network's gradient is the
    ordinary one of (f_1 + f_2) / 2. Metrics (nats): ``diffusion``, ``reconstruction``,
    ``prior``, ``reinforce`` (the value of the REINFORCE term, loss - nelbo); and the
    learned powers ``power_min``, ``power_mean``, ``power_max`` (dimensionless) when the
    schedule has them.

    The reference code omits the factor (1 - t1); with it the estimate is unbiased for
    the integral over [t1, 1].

    A ``weighting`` (:class:`ddiff.AbstractWeighting`) changes what the network trains
    on; its cross-entropy is averaged over the two draws, and its re-weighting of the
    integrand reaches the network only (the integrand with the schedule's gradient
    stopped), so the schedule keeps the bound's gradient.

    Attributes:
        t1: the start of the integral (the reference's 1e-3).
        weighting: the training weighting (None: the bound, the reference's loss).
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.STATE_DEPENDENT}),
    }
    t1: float = eqx.field(static=True, default=T1)
    weighting: ddiff.AbstractWeighting | None = None

    def __check_init__(self):
        if not 0.0 < self.t1 < 1.0:
            raise ddiff.RecipeError(f"t1 must be in (0, 1), got {self.t1}", path="t1")

    def bound_form(self):
        """The integral over [t1, 1] with the data-free decoder at t1."""
        return ddiff.BoundForm(t_start=self.t1)

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        schedule = process.schedule
        span = 1.0 - self.t1
        time = self.t1 + span * t
        weight = jnp.broadcast_to(elbo_weight(schedule, time), (process.vocab_size,))
        log_mask = jnp.broadcast_to(schedule.log_mask_probability(time), (process.vocab_size,))[x0]

        def draw(draw_key):
            noise_key, network_key = jax.random.split(draw_key)
            x_t = process.sample_marginal(x0, time, key=noise_key)
            log_mean = model.log_mean(x_t, time, label=label, key=network_key if train else None)
            masked = x_t == process.mask_id
            integrand = span * genmd4_integrand(log_mean, x0, masked, weight)
            for_network = span * genmd4_integrand(log_mean, x0, masked, jax.lax.stop_gradient(weight))
            cross_entropy = -jnp.sum(jnp.take_along_axis(log_mean, x0[:, None], axis=-1))
            return integrand, for_network, cross_entropy, _log_pattern_probability(masked, log_mask)

        integrands, for_network, cross_entropy, log_q = jax.vmap(draw)(jax.random.split(key))
        diffusion = jnp.mean(integrands)
        reinforce = 0.5 * jax.lax.stop_gradient(integrands[0] - integrands[1]) * (log_q[0] - log_q[1])
        recon = reconstruction(schedule, x0, jnp.asarray(self.t1))
        prior = process.prior_kl(x0)
        nelbo = diffusion + recon + prior
        metrics = {"diffusion": diffusion, "reconstruction": recon, "prior": prior, "reinforce": reinforce}
        if isinstance(schedule, LearnablePolySchedule):
            powers = schedule.powers()
            metrics.update(
                power_min=jnp.min(powers), power_mean=jnp.mean(powers), power_max=jnp.max(powers)
            )
        terms = ddiff.ObjectiveTerms(loss=nelbo + reinforce, nelbo=nelbo, metrics=metrics)
        return ddiff.weighted_terms(
            self.weighting, terms, process=process, t=time,
            cross_entropy=jnp.mean(cross_entropy), network_diffusion=jnp.mean(for_network),
        )  # fmt: skip


# --------------------------------------------------------------------------- sampler


def reverse_logits(
    log_mean: Float[Array, "*batch seq vocab"],
    log_mask_s: Float[Array, " vocab"],
    log_mask_t: Float[Array, " vocab"],
) -> Float[Array, "*batch seq states"]:
    """Log-probabilities over V+1 outcomes of a masked position from t to s < t under a
    per-value schedule: value v with mu[v] (alpha_s[v] - alpha_t[v]) / (1 - alpha_t[v]),
    the mask (index V) with sum_v mu[v] (1 - alpha_s[v]) / (1 - alpha_t[v]). The ratios
    come from log(1 - alpha) so they stay accurate where alpha rounds to 1."""
    log_stay = log_mask_s - log_mask_t
    log_unmask = jnp.log(-jnp.expm1(jnp.minimum(log_stay, 0.0)))
    stay = jax.nn.logsumexp(log_mean + log_stay, axis=-1, keepdims=True)
    return jnp.concatenate([log_mean + log_unmask, stay], axis=-1)


class StateDependentAncestralSampler(ddiff.AbstractSampler):
    """Ancestral sampling of a masked process whose schedule may depend on the token value
    (GenMD4; the reference code ships no sampler). On a time grid 1 = t_0 > ... > t_T = 0
    (:func:`ddiff.time_grid`), a masked position becomes v with probability
    mu_theta(x_t, t)[v] (alpha_s[v] - alpha_t[v]) / (1 - alpha_t[v]) and stays masked
    otherwise: the posterior q(x_s | x_t, x_0) averaged over x_0 ~ mu_theta. With a
    scalar schedule it is MD4's Alg. 2. Draws are exact (:func:`ddiff.categorical`), the
    loop is one ``lax.scan``; positions still masked at t = 0 are drawn from
    mu_theta(x_0, 0). Labels and classifier-free guidance go through
    :func:`ddiff.batched_log_mean`; given positions (infilling) are set at the start and
    after every step.

    Attributes:
        steps: number of reverse steps T (network evaluations: T, or T+1 when a
            position is still masked at t = 0; doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    requires = {"parameterization": frozenset({caps.MEAN}), "process": frozenset({caps.MASKED})}
    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=ddiff.grid_times(self.grid, self.steps),
            final="masked_mean",
        )

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        schedule = process.schedule
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        calls = start.calls

        def log_mask(time):
            return jnp.broadcast_to(schedule.log_mask_probability(time), (process.vocab_size,))

        def step(carry, inputs):
            x, evals = carry
            t, s, index = inputs
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            logits = reverse_logits(log_mean, log_mask(s), log_mask(t))
            draws = jax.vmap(ddiff.categorical)(ddiff.step_keys(start.loop_keys, index), logits)
            x = ddiff.apply_fixed(conditioning, jnp.where(x == mask_id, draws, x))
            return (x, evals + calls), None

        times = ddiff.time_grid(self.grid, self.steps)
        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), (times[:-1], times[1:], jnp.arange(self.steps))
        )

        x, used = ddiff.finish_masked(model, x, start=start, conditioning=conditioning)
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals + used)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("schedule", "learnable_poly", LearnablePolySchedule)
    registry.register("objective", "genmd4_elbo", GenMD4ELBO)
    registry.register("sampler", "genmd4_ancestral", StateDependentAncestralSampler)
