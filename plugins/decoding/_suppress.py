"""Token suppression: LLaDA's ``logits_eos_inf`` as a log-probability transform."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff


class SuppressTokens(ddiff.AbstractLogProbTransform):
    """Gives the listed token values probability 0 and renormalises the rest:
    mu'[v] = mu[v] / (1 - sum_{u in tokens} mu[u]) for v not listed (LLaDA's
    ``logits_eos_inf``, its logits of the end-of-text token set to -inf before the draw
    and the confidence, with ``tokens: [126081]``). A row with all its mass on listed
    tokens (a carried-over end token, a given prompt holding one) is left as it is.

    Attributes:
        tokens: the suppressed token values (at least one; each in [0, V)).
    """

    tokens: tuple[int, ...] = eqx.field(static=True)

    def __check_init__(self):
        if not self.tokens:
            raise ddiff.RecipeError("give at least one token value to suppress", path="tokens")
        if min(self.tokens) < 0:
            raise ddiff.RecipeError(f"token values must be >= 0, got {list(self.tokens)}", path="tokens")

    def __call__(self, log_probs: ddiff.LogProbRows) -> ddiff.LogProbRows:
        listed = jnp.zeros((log_probs.shape[-1],), bool).at[jnp.asarray(self.tokens)].set(True)
        kept = jnp.where(listed, -jnp.inf, log_probs)
        possible = jnp.any(jnp.isfinite(kept), axis=-1, keepdims=True)
        return jnp.where(possible, jax.nn.log_softmax(kept, axis=-1), log_probs)
