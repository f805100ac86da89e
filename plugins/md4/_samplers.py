"""MD4's samplers: ancestral on a time grid (Alg. 2), its nucleus, two-draw and cached forms,
first hitting; each a step rule over :func:`ddiff.run_sampler`."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

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


class AbstractAncestralSampler(ddiff.AbstractGridSampler):
    """MD4's reverse step (Alg. 2) on the grid of :class:`ddiff.AbstractGridSampler`, one
    batched prediction mu_theta(x_t, t) per step (labels, guidance and the sampler's
    ``transforms`` through :class:`ddiff.Prediction`); positions still masked after the
    last step are drawn from mu_theta(x, 0). The driver (:func:`ddiff.run_sampler`) starts
    from all-mask and sets the given positions after every step.

    Concrete samplers choose the draw (:meth:`draw`), the transforms of mu and whether a
    prediction is reused while no position changes (:attr:`caches`).
    """

    requires = _MD4_REQUIRES

    @property
    def caches(self) -> bool:
        """Whether a prediction is reused while the batch is unchanged."""
        return False

    def reverse_chain(self) -> ddiff.ReverseChain | None:
        """MD4 Alg. 2 on the grid, masked positions drawn from mu(x, 0) at the end (with
        caching, the same chain for a network that ignores t); the nucleus of a ``top_p``
        transform is part of the chain, other transforms are not (None)."""
        top_p = ddiff.chain(*self.transforms).as_top_p()
        if top_p is None:
            return None
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=self.times(), final="masked_mean", top_p=top_p
        )

    def draw(
        self, key: ddiff.Key, log_mean: ddiff.LogProbs, alpha_s: ddiff.Scalar,
        alpha_t: ddiff.Scalar
    ) -> ddiff.Tokens:
        """New value (V = stays masked) of each position, were it masked at t (MD4 Alg. 2:
        one categorical over V+1 outcomes, drawn exactly)."""
        return ddiff.categorical(key, _ancestral_logits(log_mean, alpha_s, alpha_t))

    def init(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, *, keys: ddiff.KeyBatch
    ) -> Any:
        """No carry; with :attr:`caches`, the last input and its prediction (refused for a
        time-conditioned network)."""
        if not self.caches:
            return None
        network = prediction.model.network
        if caps.TIME_INDEPENDENT not in network.capabilities():
            raise ddiff.IncompatibleComponentsError(
                f"sampler {type(self).__name__} reuses network outputs across times, which "
                f"is exact only for a network that ignores t, but {type(network).__name__} "
                f"is time conditioned; set network.time_conditioned: false or use sampler "
                f"'ancestral'",
                path="sampler",
            )
        vocab = prediction.model.process.vocab_size
        return jnp.full_like(tokens, -1), jnp.zeros((*tokens.shape, vocab))

    def _predict(self, prediction, tokens, t, cache):
        """log mu(x, t), the new cache and the calls made: the cached prediction while x is
        unchanged, under :attr:`caches`."""
        if not self.caches:
            log_mean, calls = prediction.log_mean(tokens, t)
            return log_mean, cache, calls
        last_tokens, last = cache
        changed = jnp.any(tokens != last_tokens)
        log_mean = jax.lax.cond(
            changed, lambda x, t: prediction.log_mean(x, t)[0], lambda x, t: last, tokens, t
        )
        return log_mean, (tokens, log_mean), changed.astype(jnp.int32) * prediction.calls

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, t: ddiff.Time,
        s: ddiff.Time, *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        schedule = prediction.model.process.schedule
        log_mean, carry, calls = self._predict(prediction, tokens, t, carry)
        alpha_s, alpha_t = schedule.alpha(s), schedule.alpha(t)
        drawn = jax.vmap(lambda key, lm: self.draw(key, lm, alpha_s, alpha_t))(keys, log_mean)
        return jnp.where(tokens == prediction.model.process.mask_id, drawn, tokens), carry, calls

    def finish(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, *,
        keys: ddiff.KeyBatch
    ) -> ddiff.SampleOutput:
        def predict(x):
            log_mean, _, calls = self._predict(prediction, x, jnp.zeros(()), carry)
            return log_mean, calls

        return prediction.finish_masked(tokens, keys=keys, predict=predict)


class AncestralSampler(AbstractAncestralSampler):
    """Ancestral sampling (MD4 Alg. 2): from t to s a masked position becomes a draw from
    Cat((alpha_s - alpha_t)/(1 - alpha_t) mu + (1 - alpha_s)/(1 - alpha_t) onehot(m)),
    drawn exactly (:func:`ddiff.categorical`), mu after the ``transforms``.

    Attributes:
        steps: number of reverse steps T (network evaluations: T, or T+1 when a
            position is still masked at t = 0; doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
        transforms: log-probability transforms of mu, in order (``transform`` sections,
            e.g. ``[{kind: top_p, top_p: 0.9}]``).
    """

    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()


class TopPSampler(AbstractAncestralSampler):
    """Ancestral sampling from the nucleus of mu (MD4's ``topp`` sampler): ``ancestral``
    with the transform ``top_p`` (:class:`ddiff.TopP`), under a name of its own. At each
    step mu is restricted to its most probable values with mass ``top_p`` and
    renormalised, then Alg. 2 is applied. ``top_p = 1`` is ancestral sampling.

    Attributes:
        steps: number of reverse steps T.
        grid: ``uniform`` or ``cosine`` time grid.
        top_p: nucleus mass in (0, 1].
    """

    top_p: float = eqx.field(static=True, default=0.98)

    def __check_init__(self):
        ddiff.TopP(top_p=self.top_p)

    @property
    def transforms(self):
        return (ddiff.TopP(top_p=self.top_p),)


class TwoDrawSampler(AbstractAncestralSampler):
    """Ancestral sampling in two draws (MD4's ``mean`` sampler, App. G): draw a clean
    value x_0^n ~ mu for every position, then reveal it with probability
    (alpha_s - alpha_t)/(1 - alpha_t). Equal in law to Alg. 2; both draws are exact.

    Attributes:
        steps: number of reverse steps T.
        grid: ``uniform`` or ``cosine`` time grid.
        transforms: log-probability transforms of mu, in order.
    """

    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()

    def draw(
        self, key: ddiff.Key, log_mean: ddiff.LogProbs, alpha_s: ddiff.Scalar,
        alpha_t: ddiff.Scalar
    ) -> ddiff.Tokens:
        value_key, reveal_key = jax.random.split(key)
        values = ddiff.categorical(value_key, log_mean)
        unmask = jnp.maximum(alpha_s - alpha_t, 0.0) / (1.0 - alpha_t)
        reveal_logits = jnp.stack([jnp.log(unmask), jnp.log1p(-unmask)])
        reveal = ddiff.categorical(reveal_key, jnp.broadcast_to(reveal_logits, (*values.shape, 2)))
        return jnp.where(reveal == 0, values, log_mean.shape[-1])


class CachedSampler(AbstractAncestralSampler):
    """Ancestral sampling that calls the network only when some position of the batch
    changed since its last call, reusing the previous prediction otherwise (Zheng et al.
    2024; MD4 sec. 4). Exact for a network that ignores t, where an unchanged input means
    an unchanged output; refused for a time-conditioned network. With many steps the
    number of network evaluations is bounded by the number of distinct states visited
    (at most D + 1 for one sequence), not by ``steps``.

    Attributes:
        steps: number of reverse steps T.
        grid: ``uniform`` or ``cosine`` time grid.
        transforms: log-probability transforms of mu, in order.
    """

    requires = {**_MD4_REQUIRES, "network": frozenset({caps.TIME_INDEPENDENT})}
    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()

    @property
    def caches(self):
        return True


class FirstHittingSampler(ddiff.AbstractLoopSampler):
    """First-hitting sampling (Zheng et al. 2024): instead of stepping on a grid, draw the
    time of the next unmasking directly. With m masked positions at time t, the next one
    unmasks at tau with 1 - alpha_tau = (1 - alpha_t) U^(1/m), U ~ U(0, 1) (each masked
    position unmasks independently with P(still masked at s | masked at t) =
    (1 - alpha_s)/(1 - alpha_t)); a uniformly chosen masked position then takes a value
    drawn from mu_theta(x, tau). Each network call unmasks one token, so the sampler is
    exact for the continuous-time reverse process and makes one call per token. The loop
    runs until no position is masked; each sample's time is the carry.

    The variant ``tokens_per_call = k > 1`` unmasks the next k positions to hit with one
    call at the first hitting time (their values drawn independently from the same mu),
    then moves to the k-th hitting time: ceil(m / k) calls, exact only when the k tokens
    are conditionally independent. Times are drawn, not taken from a grid.

    Attributes:
        tokens_per_call: positions unmasked per network call.
        transforms: log-probability transforms of mu, in order.
    """

    requires = _MD4_REQUIRES
    tokens_per_call: int = eqx.field(static=True, default=1)
    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()

    def __check_init__(self):
        ddiff.check_at_least("tokens_per_call", self.tokens_per_call)

    def reverse_chain(self) -> ddiff.ReverseChain | None:
        """The reverse CTMC, positions still masked at t = 0 drawn one at a time; with
        ``tokens_per_call`` > 1 no exact chain (the k tokens of a call are drawn
        independently)."""
        top_p = ddiff.chain(*self.transforms).as_top_p()
        if self.tokens_per_call > 1 or top_p is None:
            return None
        return ddiff.ReverseChain(
            step="continuous", reads="mean", times=(1.0, 0.0), final="sequential", top_p=top_p
        )

    def init(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, *, keys: ddiff.KeyBatch
    ) -> Any:
        """Every sample starts at t = 1."""
        return jnp.ones((tokens.shape[0],))

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        mask_id = prediction.model.process.mask_id
        return ~jnp.any(ddiff.still_masked(prediction.conditioning, tokens, mask_id))

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        schedule = prediction.model.process.schedule
        mask_id = prediction.model.process.mask_id
        num_samples, seq_len = tokens.shape
        k = min(self.tokens_per_call, seq_len)
        alpha_0, alpha_1 = schedule.alpha(jnp.zeros(())), schedule.alpha(jnp.ones(()))
        t = carry
        draw_keys = jax.vmap(lambda key: jax.random.split(key, 3))(keys)
        time_keys, position_keys, value_keys = draw_keys[:, 0], draw_keys[:, 1], draw_keys[:, 2]
        masked = ddiff.still_masked(prediction.conditioning, tokens, mask_id)
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
        log_mean, calls = prediction.log_mean(tokens, hit_times[:, 0])
        noise = jax.vmap(lambda key: ddiff.gumbel(key, (seq_len,)))(position_keys)
        priorities = jnp.where(masked, noise, -jnp.inf)
        _, chosen_positions = jax.lax.top_k(priorities, k)
        chosen = (
            jnp.zeros_like(masked).at[jnp.arange(num_samples)[:, None], chosen_positions].set(True)
            & masked
        )
        drawn = jax.vmap(ddiff.categorical)(value_keys, log_mean)
        return jnp.where(chosen, drawn, tokens), jnp.where(count > 0, hit_times[:, -1], t), calls
