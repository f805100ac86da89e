"""GenMD4's ELBO with a leave-one-out REINFORCE gradient for the schedule."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.genmd4._schedule import T1, LearnablePolySchedule


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


def reconstruction(
    schedule: ddiff.AbstractSchedule, x0: ddiff.Tokens, t1: jax.Array
) -> ddiff.Scalar:
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

    def bound_form(self) -> ddiff.BoundForm | None:
        """The integral over [t1, 1] with the data-free decoder at t1."""
        return ddiff.BoundForm(t_start=self.t1)

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
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
