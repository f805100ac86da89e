"""Campbell et al.'s continuous-time ELBO: the neighbour-averaged and single-jump estimators."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.campbell._rates import (
    _REQUIRES,
    _draw_jump,
    _picked,
    reversal_rates,
    reverse_rates,
)


class AbstractCampbellELBO(ddiff.AbstractObjective):
    """The continuous-time negative ELBO of Campbell et al. (2022, Prop. 2 / eq. 7), with
    its constant written out so that it is a bound (in nats per sequence):

        L = int_0^1 E_{x ~ q_t(.|x_0)} sum_{y != x} [ R̂_t(x -> y) - A_t(x -> y)
              + A_t(x -> y) log(A_t(x -> y) / R̂_t(x -> y)) ] dt
            + reconstruction + KL(q(x_1 | x_0) || p(x_1)),

    the path KL between the time reversal of the forward process given x_0, with rates
    A_t (:func:`reversal_rates`), and the model's reverse CTMC. Concrete estimators differ
    in how they estimate the cross term E_x sum_y A_t(x -> y) log R̂_t(x -> y): Campbell et
    al. rewrite it, summing over the state each reverse jump comes from, as
    E_x Z_t(x) E_{x~ ~ r_t(.|x)}[log R̂_t(x~ -> x)], with x~ one forward jump from x
    (r_t(x~ | x) = R_t(x -> x~) / Z_t(x), Z_t(x) the total rate of leaving x), so that the
    model is evaluated at x~ rather than at every state that can jump into x.

    The network is evaluated at x_t, at x~ and at x' ~ q_0(.|x_0) for the reconstruction
    -log prod_n mu_theta(x', 0)[n, x_0^n] (the decoder from t = 0 to the data, the same
    prediction the tau-leaping samplers draw their output from; with alpha_0 < 1 it is a
    real term): three calls per example, in one batched call. tauLDR's released configs
    use ``one_forward_pass``, which evaluates the x_t term at x~ too; that is one call but
    biased (x~ is not distributed as x_t), so it is not offered.

    ``loss`` is the bound unless a ``weighting`` says otherwise
    (:class:`ddiff.AbstractWeighting`; tauLDR's ``nll_weight`` is its ``cross_entropy``
    times D, as tauLDR averages its cross-entropy over positions); the cross-entropy is
    -sum_n log mu_theta(x_t, t)[n, x_0^n], reported as ``cross_entropy``.
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = _REQUIRES
    weighting: eqx.AbstractVar[ddiff.AbstractWeighting | None]

    @abc.abstractmethod
    def diffusion(
        self, process: ddiff.AbstractRateProcess, x0: ddiff.Tokens, x_t: ddiff.Tokens,
        x_tilde: ddiff.Tokens, jump: tuple[jax.Array, jax.Array, jax.Array],
        log_mean: ddiff.LogProbs, log_mean_tilde: ddiff.LogProbs, t: ddiff.Time
    ) -> ddiff.Scalar:
        """The estimate of the bound's integrand at t from one draw x_t and one forward
        jump from it, x~ = x_t^{n<-y} (x_t itself where Z_t(x_t) = 0), with ``jump`` =
        (n, y, Z_t(x_t)) and the model's log means at x_t and at x~."""

    def bound_form(self) -> ddiff.BoundForm | None:
        """The integral over [0, 1] with the model's decoder mu_theta(x_0', 0) at t = 0."""
        return ddiff.BoundForm(decoder="model")

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
        process = model.process
        noise_key, jump_key, start_key, network_key = jax.random.split(key, 4)
        x_t = process.sample_marginal(x0, t, key=noise_key)
        jump = _draw_jump(process, x_t, t, jump_key)
        position, new_state, exit_total = jump
        x_tilde = jnp.where(exit_total > 0, x_t.at[position].set(new_state), x_t)
        x_start = process.sample_marginal(x0, jnp.zeros(()), key=start_key)

        # The three inputs are known before any prediction: one batched network call.
        inputs = jnp.stack([x_t, x_tilde, x_start])
        times = jnp.stack([t, t, jnp.zeros_like(t)])
        keys = jax.random.split(network_key, 3) if train else None
        log_mean, log_mean_tilde, log_decoder = jax.vmap(
            lambda x, s, k: model.log_mean(x, s, label=label, key=k), (0, 0, 0 if train else None)
        )(inputs, times, keys)

        diffusion = self.diffusion(process, x0, x_t, x_tilde, jump, log_mean, log_mean_tilde, t)
        reconstruction = -jnp.sum(_picked(log_decoder, x0))
        prior = process.prior_kl(x0)
        nelbo = diffusion + reconstruction + prior
        cross_entropy = -jnp.sum(_picked(log_mean, x0))
        terms = ddiff.ObjectiveTerms(
            loss=nelbo,
            nelbo=nelbo,
            metrics={
                "diffusion": diffusion,
                "reconstruction": reconstruction,
                "prior": prior,
                "cross_entropy": cross_entropy,
            },
        )
        return ddiff.weighted_terms(
            self.weighting, terms, process=process, t=t, cross_entropy=cross_entropy
        )


class CampbellELBO(AbstractCampbellELBO):
    """Campbell et al.'s bound with the estimator of their released code (tauLDR's
    ``GenericAux`` loss), written out as a bound: the single-jump estimator
    (:class:`CampbellSingleJumpELBO`) with its jump term averaged over every state x_t
    could have jumped from to reach x~, all read from the one network call at x~:

        L_t ~ sum_{y != x_t} R̂_t(x_t -> y)
              + w(x~) sum_y A_t(x~ -> y) ( log A_t(x~ -> y) - log R̂_t(x~ -> y) - 1 ),
        1 / w(x~) = sum_y A_t(x~ -> y) / Z_t(y),

    the sums running over the neighbours y of x~ (one position changed). Given x~, the
    state it jumped from is x_t = y with probability proportional to A_t(x~ -> y) / Z_t(y),
    so the second line is E[Z_t(x_t) (log A_t(x~, x_t) - log R̂_t(x~ -> x_t) - 1) | x~]:
    the single-jump term Rao-Blackwellised over x_t, hence unbiased. Equivalently
    w(x~) = q_t(x~ | x_0) / r_t(x~), with r_t(x~) = sum_x q_t(x | x_0) R_t(x -> x~) / Z_t(x)
    the law of x~: an importance weight that turns the average over x~ into one over
    q_t. Where x_t cannot jump the term is 0 (r_t then has mass below 1, which the weight
    accounts for). tauLDR drops the model-free terms (log A_t and -1), which leaves its
    loss off the bound by a constant.

    On the masked process with the ``mean`` parameterization (M masked and C clean
    positions in x_t, h the masking rate, alpha_t the survival probability) it is

        h (alpha_t M / (1 - alpha_t) - C)
            + h C / (M + 1) sum over the M + 1 masked positions n of x~ of -log mu_theta(x~, t)[n, x_0^n],

    MD4's cross-entropy averaged over every position that could have been the last one
    masked, where the single-jump estimator scores only that one. O(S) per position (the
    exit rate of every state from ``process.state_exit_rates``).

    Attributes:
        weighting: the training weighting (None: the bound).
    """

    weighting: ddiff.AbstractWeighting | None = None

    def diffusion(
        self, process: ddiff.AbstractRateProcess, x0: ddiff.Tokens, x_t: ddiff.Tokens,
        x_tilde: ddiff.Tokens, jump: tuple[jax.Array, jax.Array, jax.Array],
        log_mean: ddiff.LogProbs, log_mean_tilde: ddiff.LogProbs, t: ddiff.Time
    ) -> ddiff.Scalar:
        exit_total = jump[2]
        reverse_exit = jnp.sum(reverse_rates(process, log_mean, x_t, t))
        rates, log_ratio = reversal_rates(process, x0, x_tilde, t)
        active = rates > 0
        log_score = process.log_score_from_mean(log_mean_tilde, x_tilde, t)
        log_gap = log_ratio - jnp.where(active, log_score, 0.0) - 1.0
        total = jnp.sum(jnp.where(active, rates * log_gap, 0.0))
        exits = process.state_exit_rates(t)
        own = exits[x_tilde]
        neighbour_exits = jnp.sum(own) - own[:, None] + exits[None, :]
        normaliser = jnp.sum(
            jnp.where(active, rates / jnp.where(active, neighbour_exits, 1.0), 0.0)
        )
        reachable = (exit_total > 0) & (normaliser > 0)
        jump_term = total / jnp.where(reachable, normaliser, 1.0)
        return reverse_exit + jnp.where(reachable, jump_term, 0.0)


class CampbellSingleJumpELBO(AbstractCampbellELBO):
    """Campbell et al.'s bound with the estimator of their paper's Prop. 2: the cross term
    from the single jump x~ = x_t^{n<-y} actually drawn,

        L_t ~ sum_{y != x_t} R̂_t(x_t -> y)
              + Z_t(x_t) ( log A_t(x~, x_t) - log R̂_t(x~ -> x_t) - 1 ),

    where A_t(x~, x_t) = R_t(x_t -> x~) q_t(x_t | x_0) / q_t(x~ | x_0) and
    log A - log R̂ = log q_t(x_t^n | x_0^n) - log q_t(y | x_0^n)
    - log s_theta(x~, t)[n, x_t^n] (the forward rate cancels); 0 where x_t cannot jump.
    Unbiased for the same bound as :class:`CampbellELBO` and noisier (it is that
    estimator before the average over x_t given x~); kept for comparison
    (``ddiff diagnose``).

    Attributes:
        weighting: the training weighting (None: the bound).
    """

    weighting: ddiff.AbstractWeighting | None = None

    def diffusion(
        self, process: ddiff.AbstractRateProcess, x0: ddiff.Tokens, x_t: ddiff.Tokens,
        x_tilde: ddiff.Tokens, jump: tuple[jax.Array, jax.Array, jax.Array],
        log_mean: ddiff.LogProbs, log_mean_tilde: ddiff.LogProbs, t: ddiff.Time
    ) -> ddiff.Scalar:
        position, new_state, exit_total = jump
        can_jump = exit_total > 0
        current = x_t[position]
        reverse_exit = jnp.sum(reverse_rates(process, log_mean, x_t, t))
        model_log_ratio = process.log_score_from_mean(log_mean_tilde, x_tilde, t)[position, current]
        q = process.marginal_probs(x0[position][None], t)[0]
        true_log_ratio = jnp.log(q[current]) - jnp.log(q[new_state])
        jump_term = jnp.where(can_jump, true_log_ratio - model_log_ratio - 1.0, 0.0)
        return reverse_exit + exit_total * jump_term


# --------------------------------------------------------------------------- samplers
