"""MD4's continuous- and discrete-time ELBOs (Shi et al., NeurIPS 2024, eq. 5 and sec. 4)."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps


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

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
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

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
        schedule = model.process.schedule
        s = jnp.maximum(t - 1.0 / self.steps, 0.0)
        alpha_s, alpha_t = schedule.alpha(s), schedule.alpha(t)
        weight = self.steps * (alpha_s - alpha_t) / (1.0 - alpha_t)
        log_likelihood, _ = _masked_terms(model, x0, t, key, label, train)
        return ddiff.bound_terms(model, x0, -weight * log_likelihood)
