"""Campbell et al. (NeurIPS 2022, "A Continuous Time Framework for Discrete Denoising
Models", code: tauLDR): the continuous-time ELBO of a CTMC whose reverse rates are built
from a mean, and tau-leaping samplers.

Notation: a factorized process with forward rates R_t(x^n -> y) per position (``rates``
capability), Z_t(x) = sum_n sum_{y != x^n} R_t(x^n -> y) the total rate of leaving x,
mu_theta(x, t) the model's mean and s_theta(x, t)[n, y] the concentration ratios read
from it (``process.log_score_from_mean``). The model's reverse rates (Campbell et al.
Prop. 3 for a factorized denoiser) move one position n of x to y with

    R̂_t(x -> x^{n<-y}) = R_t(y -> x^n) s_theta(x, t)[n, y],    y != x^n.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

_REQUIRES = {
    "parameterization": frozenset({caps.MEAN}),
    "process": frozenset({caps.RATES, caps.FACTORIZED, caps.SCALAR_SCHEDULE}),
}
"""The rates are read from alpha_t, and float32 keeps 1 - alpha_t only while alpha_t < 1:
a per-value schedule such as GenMD4's (alpha_0 = 1, alpha_t[v] = 1 - t^{w_v} rounding to
1 at small t while its rate does not vanish) would overflow the reverse rates, so a scalar
schedule is required (MD4's keep alpha <= 1 - eps)."""


def reverse_rates(
    process: ddiff.AbstractRateProcess, log_mean: ddiff.LogProbs, x: ddiff.Tokens, t: ddiff.Time
) -> ddiff.StateProbs:
    """R̂_t(x -> x^{n<-y}) for every position n and state y (0 at y = x^n), from the mean:
    R_t(y -> x^n) s[n, y] with s = exp(log_score_from_mean). O(S) per position."""
    score = jnp.exp(process.log_score_from_mean(log_mean, x, t))
    rates = process.incoming_rates(x, t) * score
    return jnp.where(jax.nn.one_hot(x, process.num_states, dtype=bool), 0.0, rates)


def _picked(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def _draw_jump(
    process: ddiff.AbstractRateProcess, x: ddiff.Tokens, t: ddiff.Time, key: ddiff.Key
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One forward jump from x: position n with probability exit_n / Z_t(x), then its new
    state y with probability R_t(x^n -> y) / exit_n (y != x^n). Returns (n, y, Z_t(x))."""
    position_key, state_key = jax.random.split(key)
    exits = process.exit_rates(x, t)
    position = ddiff.categorical_from_probs(position_key, exits)
    row = process.forward_rates(x[position][None], t)[0]
    row = jnp.where(jnp.arange(process.num_states) == x[position], 0.0, row)
    return position, ddiff.categorical_from_probs(state_key, row), jnp.sum(exits)


def reversal_rates(
    process: ddiff.AbstractRateProcess, x0: ddiff.Tokens, x: ddiff.Tokens, t: ddiff.Time
) -> tuple[ddiff.StateProbs, ddiff.StateProbs]:
    """The rates of the time reversal of the forward process given x_0 (Campbell et al.
    Prop. 1 conditioned on x_0), A_t(x -> x^{n<-y}) = R_t(y -> x^n) q_t(y | x_0^n) /
    q_t(x^n | x_0^n) for every position n and state y, with log(q_t(y | x_0^n) /
    q_t(x^n | x_0^n)). Both are 0 at y = x^n and wherever A is 0. O(S) per position."""
    marginal = process.marginal_probs(x0, t)
    current = jnp.take_along_axis(marginal, x[:, None], axis=-1)
    other = ~jax.nn.one_hot(x, process.num_states, dtype=bool)
    possible = current > 0
    rates = jnp.where(other, process.incoming_rates(x, t), 0.0)
    rates = jnp.where(possible, rates * marginal / jnp.where(possible, current, 1.0), 0.0)
    active = rates > 0
    log_current = jnp.log(jnp.where(possible, current, 1.0))
    log_ratio = jnp.log(jnp.where(active, marginal, 1.0)) - log_current
    return rates, jnp.where(active, log_ratio, 0.0)


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
        self,
        process: ddiff.AbstractRateProcess,
        x0: ddiff.Tokens,
        x_t: ddiff.Tokens,
        x_tilde: ddiff.Tokens,
        jump: tuple[jax.Array, jax.Array, jax.Array],
        log_mean: ddiff.LogProbs,
        log_mean_tilde: ddiff.LogProbs,
        t: ddiff.Time,
    ) -> ddiff.Scalar:
        """The estimate of the bound's integrand at t from one draw x_t and one forward
        jump from it, x~ = x_t^{n<-y} (x_t itself where Z_t(x_t) = 0), with ``jump`` =
        (n, y, Z_t(x_t)) and the model's log means at x_t and at x~."""

    def bound_form(self):
        """The integral over [0, 1] with the model's decoder mu_theta(x_0', 0) at t = 0."""
        return ddiff.BoundForm(decoder="model")

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
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

    def diffusion(self, process, x0, x_t, x_tilde, jump, log_mean, log_mean_tilde, t):
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

    def diffusion(self, process, x0, x_t, x_tilde, jump, log_mean, log_mean_tilde, t):
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


def _leap(key: ddiff.Key, x: ddiff.Tokens, rates: ddiff.StateProbs, tau: jax.Array) -> ddiff.Tokens:
    """One tau-leap of every position under ``rates`` (0 at the current state) held fixed
    for a time ``tau``: the jumps proposed at position n to each y are independent
    Poisson(tau rates[n, y]) counts. For categorical data a position moves only when
    exactly one jump is proposed there (to y with probability rates[n, y] / sum_y), and
    stays when none or several are (Campbell et al. sec. 4, tauLDR's
    ``reject_multiple_jumps``). Drawn exactly: the total count is Poisson(lambda) with
    lambda = tau sum_y rates[n, y], so P(exactly one) = lambda exp(-lambda)."""
    move_key, target_key = jax.random.split(key)
    total = tau * jnp.sum(rates, axis=-1)
    one = total * jnp.exp(-total)
    log_one = ddiff.safe_log(total) - total
    moves = ddiff.categorical(move_key, jnp.stack([log_one, jnp.log1p(-one)], axis=-1)) == 0
    target = ddiff.categorical_from_probs(target_key, rates)
    return jnp.where(moves, target, x)


class AbstractTauLeapingSampler(ddiff.AbstractSampler):
    """Tau-leaping on a time grid 1 = t_0 > ... > t_T = 0 (Campbell et al. sec. 4): from
    t_i to t_{i+1} every position leaps under the model's reverse rates at t_i
    (:func:`reverse_rates`, from one batched mean per step), then concrete samplers may
    add corrector steps. The reverse process starts from the process prior; the output
    is drawn from mu_theta(x, 0) at every position (a draw, not tauLDR's argmax: it is the
    decoder of :class:`CampbellELBO`, and it keeps the sampler exact as the steps grow;
    a masked process's clean tokens are carried over by the mean). The loop is one
    ``lax.scan``; labels and guidance go through :func:`ddiff.batched_log_mean`; given
    positions are set at the start and after every leap.

    Infilling is exact for a process whose clean tokens cannot be noise (the masked
    process); for the uniform process the network reads the given tokens as possibly
    noisy, so projecting them back is the usual approximation.
    """

    requires = _REQUIRES
    steps: eqx.AbstractVar[int]
    grid: eqx.AbstractVar[ddiff.TimeGrid]

    def correct(
        self,
        model: ddiff.DiffusionModel,
        x: ddiff.TokenBatch,
        s: jax.Array,
        tau: jax.Array,
        conditioning: ddiff.Conditioning,
        *,
        keys: ddiff.KeyBatch,
    ) -> tuple[ddiff.TokenBatch, jax.Array]:
        """Corrector moves at time s after a predictor step of length tau, sample i's
        randomness from ``keys[i]``; returns the tokens and the network calls made
        (default: none)."""
        return x, jnp.int32(0)

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        calls = start.calls

        def step(carry, inputs):
            x, evals = carry
            t, s, index = inputs
            split = jax.vmap(jax.random.split)(ddiff.step_keys(start.loop_keys, index))
            leap_keys, correct_keys = split[:, 0], split[:, 1]
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            rates = jax.vmap(lambda lm, xi: reverse_rates(process, lm, xi, t))(log_mean, x)
            x = ddiff.apply_fixed(
                conditioning, jax.vmap(_leap, (0, 0, 0, None))(leap_keys, x, rates, t - s)
            )
            x, used = self.correct(model, x, s, t - s, conditioning, keys=correct_keys)
            return (x, evals + calls + used), None

        times = ddiff.time_grid(self.grid, self.steps)
        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), (times[:-1], times[1:], jnp.arange(self.steps))
        )
        log_mean, _ = ddiff.batched_log_mean(model, x, jnp.zeros(()), conditioning)
        x = ddiff.apply_fixed(conditioning, jax.vmap(ddiff.categorical)(start.final_keys, log_mean))
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals + calls)


class TauLeapingSampler(AbstractTauLeapingSampler):
    """Tau-leaping (Campbell et al. sec. 4): every position leaps independently under the
    reverse rates at the start of each step, moving only when exactly one jump is
    proposed there.

    Attributes:
        steps: number of leaps T (network evaluations: T + 1, doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    steps: int = eqx.field(static=True, default=256)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step="tau_leap", reads="mean", times=ddiff.grid_times(self.grid, self.steps), final="mean"
        )


class PredictorCorrectorSampler(AbstractTauLeapingSampler):
    """Tau-leaping with corrector steps (Campbell et al. sec. 4.2): after each
    leap to time s <= ``corrector_entry_time`` (s > 0), ``corrector_steps`` leaps of length
    ``corrector_step_size`` x (step length) under the rates R_s(x -> y) + R̂_s(x -> y),
    forward plus reverse, whose CTMC leaves q_s invariant; each is one more network call.
    A leap keeps that invariance only to first order in its length (a position moves with
    probability lambda e^-lambda, not in proportion to lambda), so long corrector leaps
    add a bias of their own. The defaults are tauLDR's settings for categorical data
    (its piano configuration): 2 corrector leaps of 0.1 step from t = 0.9.

    Attributes:
        steps: number of predictor leaps T.
        grid: ``uniform`` or ``cosine`` time grid.
        corrector_steps: corrector leaps after each predictor leap.
        corrector_step_size: their length as a multiple of the predictor's.
        corrector_entry_time: correctors run only at times s <= this.
    """

    steps: int = eqx.field(static=True, default=256)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")
    corrector_steps: int = eqx.field(static=True, default=2)
    corrector_step_size: float = eqx.field(static=True, default=0.1)
    corrector_entry_time: float = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)
        ddiff.check_at_least("corrector_steps", self.corrector_steps)
        if not self.corrector_step_size > 0:
            raise ddiff.RecipeError(
                f"corrector_step_size must be positive, got {self.corrector_step_size}",
                path="corrector_step_size",
            )
        if not 0.0 <= self.corrector_entry_time <= 1.0:
            raise ddiff.RecipeError(
                f"must be in [0, 1], got {self.corrector_entry_time}",
                path="corrector_entry_time",
            )

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step="tau_leap", reads="mean", times=ddiff.grid_times(self.grid, self.steps),
            final="mean", corrector_steps=self.corrector_steps,
            corrector_size=self.corrector_step_size, corrector_entry=self.corrector_entry_time,
        )

    def correct(self, model, x, s, tau, conditioning, *, keys):
        process = model.process
        calls = ddiff.calls_per_prediction(conditioning)

        def corrector(x, index):
            log_mean, _ = ddiff.batched_log_mean(model, x, s, conditioning)

            def rates(lm, xi):
                forward = process.forward_rates(xi, s)
                forward = jnp.where(
                    jax.nn.one_hot(xi, process.num_states, dtype=bool), 0.0, forward
                )
                return forward + reverse_rates(process, lm, xi, s)

            moved = jax.vmap(_leap, (0, 0, 0, None))(
                ddiff.step_keys(keys, index), x, jax.vmap(rates)(log_mean, x),
                self.corrector_step_size * tau,
            )  # fmt: skip
            return ddiff.apply_fixed(conditioning, moved), None

        def run(x):
            x, _ = jax.lax.scan(corrector, x, jnp.arange(self.corrector_steps))
            return x, jnp.int32(self.corrector_steps * calls)

        active = (s > 0) & (s <= self.corrector_entry_time)
        return jax.lax.cond(active, run, lambda x: (x, jnp.int32(0)), x)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("objective", "campbell_elbo", CampbellELBO)
    registry.register("objective", "campbell_elbo_single_jump", CampbellSingleJumpELBO)
    registry.register("sampler", "tau_leaping", TauLeapingSampler)
    registry.register("sampler", "tau_leaping_pc", PredictorCorrectorSampler)
