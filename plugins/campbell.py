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


class CampbellELBO(ddiff.AbstractObjective):
    """The continuous-time negative ELBO of Campbell et al. (2022, Prop. 2 / eq. 7), with
    its constant written out so that it is a bound (in nats per sequence):

        L = E_{t ~ U(0,1), x ~ q_t(.|x_0), x~ ~ r_t(.|x)} [ sum_{y != x} R̂_t(x -> y)
              + Z_t(x) ( log A_t(x~, x) - log R̂_t(x~ -> x) - 1 ) ]
            + reconstruction + KL(q(x_1 | x_0) || p(x_1)),

    where x~ is one forward jump from x (r_t(x~|x) = R_t(x -> x~) / Z_t(x)) and
    A_t(x~, x) = R_t(x -> x~) q_t(x | x_0) / q_t(x~ | x_0) is the rate of the reversal of
    the forward process conditioned on x_0. The integrand is the path KL between that
    reversal and the model's reverse CTMC (as in the proof of Prop. 2: the reversal's rates
    into x, summed over the x~ they come from, equal Z_t(x) E_{x~}[.] by a change of
    variables). With x~ = x^{n<-y}, log A - log R̂ = log q_t(x^n | x_0^n) - log q_t(y | x_0^n)
    - log s_theta(x~, t)[n, x^n]: the forward rate cancels. Where x cannot jump
    (Z_t(x) = 0) the second term is 0.

    The network is evaluated at x (the total reverse rate out of x, and the auxiliary
    cross-entropy), at x~ (the reverse rate from x~ back to x), and at x' ~ q_0(.|x_0) for
    the reconstruction -log prod_n mu_theta(x', 0)[n, x_0^n] (the decoder from t = 0 to the
    data, the same prediction the tau-leaping samplers draw their output from; with
    alpha_0 < 1 it is a real term): three calls per example. tauLDR's released configs
    use ``one_forward_pass``, which evaluates the first term at x~ too; that is one call
    but biased (x~ is not distributed as x_t), so it is not offered.

    Attributes:
        nll_weight: weight lambda of an auxiliary cross-entropy
            -sum_n log mu_theta(x_t, t)[n, x_0^n] added to ``loss`` only (tauLDR's
            ``nll_weight``, which averages over positions, so its w is w / D here);
            ``nelbo`` stays the bound.
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = _REQUIRES
    nll_weight: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        ddiff.check_at_least("nll_weight", self.nll_weight, 0)

    def bound_form(self):
        """The integral over [0, 1] with the model's decoder mu_theta(x_0', 0) at t = 0."""
        return ddiff.BoundForm(decoder="model")

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        noise_key, jump_key, start_key, network_key = jax.random.split(key, 4)
        x_t = process.sample_marginal(x0, t, key=noise_key)
        position, new_state, exit_total = _draw_jump(process, x_t, t, jump_key)
        can_jump = exit_total > 0
        current = x_t[position]
        x_tilde = jnp.where(can_jump, x_t.at[position].set(new_state), x_t)
        x_start = process.sample_marginal(x0, jnp.zeros(()), key=start_key)

        # The three inputs are known before any prediction: one batched network call.
        inputs = jnp.stack([x_t, x_tilde, x_start])
        times = jnp.stack([t, t, jnp.zeros_like(t)])
        keys = jax.random.split(network_key, 3) if train else None
        log_mean, log_mean_tilde, log_decoder = jax.vmap(
            lambda x, s, k: model.log_mean(x, s, label=label, key=k), (0, 0, 0 if train else None)
        )(inputs, times, keys)

        reverse_exit = jnp.sum(reverse_rates(process, log_mean, x_t, t))
        model_log_ratio = process.log_score_from_mean(log_mean_tilde, x_tilde, t)[position, current]
        q = process.marginal_probs(x0[position][None], t)[0]
        true_log_ratio = jnp.log(q[current]) - jnp.log(q[new_state])
        jump = jnp.where(can_jump, true_log_ratio - model_log_ratio - 1.0, 0.0)
        diffusion = reverse_exit + exit_total * jump
        reconstruction = -jnp.sum(_picked(log_decoder, x0))
        prior = process.prior_kl(x0)
        nelbo = diffusion + reconstruction + prior
        cross_entropy = -jnp.sum(_picked(log_mean, x0))
        return ddiff.ObjectiveTerms(
            loss=nelbo + self.nll_weight * cross_entropy,
            nelbo=nelbo,
            metrics={
                "diffusion": diffusion,
                "reconstruction": reconstruction,
                "prior": prior,
                "cross_entropy": cross_entropy,
            },
        )


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
    registry.register("sampler", "tau_leaping", TauLeapingSampler)
    registry.register("sampler", "tau_leaping_pc", PredictorCorrectorSampler)
