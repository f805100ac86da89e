"""D3PM's ancestral sampler on its grid of T steps."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps


class D3PMAncestralSampler(ddiff.AbstractSampler):
    """Ancestral sampling of the T-step model (D3PM sec. 3.3): x_T from the prior, then
    x_{i-1} ~ p_theta(x_{i-1} | x_i) (the process's ``log_posterior_from_mean`` at
    s = (i-1)/T, t = i/T) for i = T..2, and x_0 ~ mu_theta(x_1, 1/T); every draw exact
    (:func:`ddiff.categorical`), one ``lax.scan``. Labels and classifier-free guidance
    go through :func:`ddiff.batched_log_mean`; given positions (infilling) are written
    into x after the prior draw and after every step, which is exact for the absorbing
    process and an approximation for the others (a given token in x_t reads as
    possibly noisy). D3PM's code takes the most probable x_0 at the last step; this
    draws it, so that the output follows the model.

    With fewer steps than the model was trained with, steps are skipped evenly (the
    x0-parameterization allows it, D3PM sec. 3.3); on a process or schedule tabulated
    for T steps, ``steps`` must divide T.

    Attributes:
        steps: reverse steps (network evaluations: ``steps``, doubled under guidance).
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.TRANSITIONS}),
    }
    steps: int = eqx.field(static=True, default=1000)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def reverse_chain(self):
        """Steps from i/T to (i-1)/T for i = T..2, then x_0 ~ mu(x, 1/T) at every position."""
        times = jnp.arange(self.steps, 0, -1, dtype=jnp.int32).astype(jnp.float32) / self.steps
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=tuple(float(t) for t in times.tolist()),
            final="mean",
        )

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        x, calls = start.tokens, start.calls

        def step(x, index):
            t = index.astype(jnp.float32) / self.steps
            s = (index - 1).astype(jnp.float32) / self.steps
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            log_probs = jax.vmap(lambda x_t, lm: process.log_posterior_from_mean(x_t, lm, s, t))(
                x, log_mean
            )
            drawn = jax.vmap(ddiff.categorical)(ddiff.step_keys(start.loop_keys, index), log_probs)
            return ddiff.apply_fixed(conditioning, drawn), None

        if self.steps > 1:
            x, _ = jax.lax.scan(step, x, jnp.arange(self.steps, 1, -1, dtype=jnp.int32))
        log_mean, _ = ddiff.batched_log_mean(
            model, x, jnp.asarray(1.0 / self.steps, jnp.float32), conditioning
        )
        x = ddiff.apply_fixed(conditioning, jax.vmap(ddiff.categorical)(start.final_keys, log_mean))
        return ddiff.SampleOutput(tokens=x, num_function_evals=jnp.int32(self.steps * calls))
