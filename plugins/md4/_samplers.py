"""MD4's samplers: ancestral on a time grid (Alg. 2), its two-draw and cached forms, first hitting."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.md4._objectives import _MD4_REQUIRES

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
