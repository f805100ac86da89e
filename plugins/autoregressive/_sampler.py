"""Left-to-right ancestral sampling, one position per network call."""

import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.autoregressive._process import LEFT_TO_RIGHT


class LeftToRightSampler(ddiff.AbstractSampler):
    """Ancestral sampling of an autoregressive model: position n = 0..D-1 is drawn from
    mu_theta(x_t_n, t_n)[n] = p_theta(x_n | x_<n) (exactly, :func:`ddiff.categorical`)
    with the earlier positions visible and the later ones masked; one network call per
    position (doubled under guidance), skipped where every sample gives the position.
    Labels and classifier-free guidance go through :func:`ddiff.batched_log_mean`.

    Distribution: exactly the model's. Infilling keeps every given position; a given
    prefix is conditioned on exactly, but a position given after a free one is not seen
    by the draws before it (an autoregressive model cannot look ahead), so such samples
    are not drawn from the conditional given it.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({LEFT_TO_RIGHT}),
    }

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        batch = keys.shape[0]
        given, given_tokens = conditioning.given(batch, seq_len)

        def step(carry, n):
            x, evals = carry

            def draw(x):
                time = 1.0 - n.astype(jnp.float32) / seq_len
                log_mean, calls = ddiff.batched_log_mean(model, x, time, conditioning)
                keys = ddiff.step_keys(start.loop_keys, n)
                return jax.vmap(ddiff.categorical)(keys, log_mean[:, n]), jnp.int32(calls)

            drawn, used = jax.lax.cond(
                jnp.all(given[:, n]), lambda x: (given_tokens[:, n], jnp.int32(0)), draw, x
            )
            x = x.at[:, n].set(jnp.where(given[:, n], given_tokens[:, n], drawn))
            return (x, evals + used), None

        initial = jnp.full((batch, seq_len), process.mask_id, jnp.int32)
        (x, evals), _ = jax.lax.scan(step, (initial, jnp.int32(0)), jnp.arange(seq_len))
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)
