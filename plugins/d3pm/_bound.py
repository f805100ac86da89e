"""D3PM's variational bound L_vb and hybrid loss L_lambda, in log space."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.d3pm._schedules import _grid_index


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

    def bound_form(self) -> ddiff.BoundForm | None:
        """L_vb of the T-step model; its i = 1 term is the decoder -log mu(x_1, 1/T)[x_0]."""
        return ddiff.BoundForm(steps=self.steps, decoder="model")

    def step_term(
        self, process: ddiff.AbstractTransitionProcess, x0: ddiff.Tokens, x_t: ddiff.Tokens,
        log_mean: ddiff.LogProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.Scalar:
        """The term of L_vb for the step from t back to s = t - 1/T, for one draw x_t:
        KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)) summed over positions, or at the first
        step (s = 0) -log p_theta(x_0 | x_t) = -sum_n log mu[n, x_0^n]."""
        log_q = process.log_posterior(x_t, x0, s, t)
        log_p = process.log_posterior_from_mean(x_t, log_mean, s, t)
        return jnp.where(s <= 0, -_clean_log_likelihood(log_mean, x0), categorical_kl(log_q, log_p))

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
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
