"""Training weightings of the continuous-time bounds (``weighting:`` of ``md4_elbo``,
``genmd4_elbo``, ``score_entropy``, ``campbell_elbo`` and ``campbell_elbo_single_jump``):
what the network is trained on, while ``nelbo`` and every evaluation stay the bound.

Notation: alpha_t the probability that a token is still clean (one per token value for
a per-value schedule), CE = -sum_n log mu_theta(x_t, t)[n, x_0^n] at the objective's draw
x_t, and the loss of a weighting with integrand factor rho(t) and cross-entropy weight
lambda (:class:`ddiff.AbstractWeighting`):

    loss = rho(t) diffusion + reconstruction + prior (+ the objective's surrogate terms)
           + lambda CE.
"""

import equinox as eqx
import jax.numpy as jnp

import ddiff


class BoundWeighting(ddiff.AbstractWeighting):
    """The bound, optionally plus an auxiliary cross-entropy (rho = 1):

        loss = nelbo + lambda CE.

    lambda = 0 trains on the bound (MD4, GenMD4, SEDD). D3PM's hybrid loss adds
    lambda_D3PM CE to one T-th of the bound (``d3pm_vb``'s ``hybrid_weight``), which is
    lambda = lambda_D3PM T here; tauLDR's ``nll_weight`` averages its cross-entropy over
    the D positions, which is lambda = nll_weight / D.

    Attributes:
        cross_entropy: lambda >= 0, per nat of the sequence's cross-entropy.
    """

    cross_entropy: float = eqx.field(static=True, default=0.0)


class UnweightedWeighting(ddiff.AbstractWeighting):
    """The bound's integrand without its time weight: rho(t) = 1 / w(t), with
    w(t) = -alpha'_t / (1 - alpha_t) the masked bound's weight (averaged over token values
    for a per-value schedule), so that on the masked process

        loss = sum_{masked n} -log mu_theta(x_t, t)[n, x_0^n] + reconstruction + prior
               + lambda CE,

    the plain masked cross-entropy at a uniform time, as MaskGIT (Chang et al. 2022)
    trains (the continuous-time bound weights it by w(t), 1/t for the linear schedule).
    On other processes (SEDD's uniform graph) it is the same re-weighting in time of
    their bound's integrand. rho(t) is 0 where alpha' = 0, and reaches the network only.

    Attributes:
        cross_entropy: lambda >= 0, per nat of the sequence's cross-entropy.
    """

    cross_entropy: float = eqx.field(static=True, default=0.0)

    def diffusion_weight(
        self, process: ddiff.AbstractForwardProcess, t: ddiff.Time
    ) -> ddiff.Scalar | None:
        schedule = process.schedule
        exp_log_gone = jnp.exp(-schedule.log_mask_probability(t))
        rate = -jnp.mean(schedule.alpha_derivative(t) * exp_log_gone)
        return jnp.where(rate > 0, 1.0 / jnp.where(rate > 0, rate, 1.0), 0.0)


COMPONENTS: dict[str, dict[str, type]] = {
    "weighting": {"bound": BoundWeighting, "unweighted": UnweightedWeighting},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
