"""Score entropy (Lou et al. 2024, eq. 8), the denoising form of SEDD's loss."""

import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.sedd._parameterization import _has_posterior


def score_entropy(
    process: ddiff.AbstractRateProcess, log_score: ddiff.StateLogProbs, x0: ddiff.Tokens,
    x_t: ddiff.Tokens, t: ddiff.Time
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

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
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
