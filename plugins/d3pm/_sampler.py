"""D3PM's ancestral sampler on its grid of T steps, a step rule over :func:`ddiff.run_sampler`."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

import ddiff
from ddiff import capabilities as caps


class D3PMAncestralSampler(ddiff.AbstractLoopSampler):
    """Ancestral sampling of the T-step model (D3PM sec. 3.3): x_T from the prior, then
    x_{i-1} ~ p_theta(x_{i-1} | x_i) (the process's ``log_posterior_from_mean`` at
    s = (i-1)/T, t = i/T) for i = T..2, step k = T - i of the driver's loop
    (:func:`ddiff.run_sampler`), and x_0 ~ mu_theta(x_1, 1/T) as the finish; every draw
    exact (:func:`ddiff.categorical`), mu after the ``transforms``. The driver handles
    labels and guidance and writes the given positions into x after the prior draw and
    after every step, which is exact for the absorbing process and an approximation for
    the others (a given token in x_t reads as possibly noisy). D3PM's code takes the most
    probable x_0 at the last step; this draws it, so that the output follows the model.

    With fewer steps than the model was trained with, steps are skipped evenly (the
    x0-parameterization allows it, D3PM sec. 3.3); on a process or schedule tabulated
    for T steps, ``steps`` must divide T.

    Attributes:
        steps: reverse steps (network evaluations: ``steps``, doubled under guidance).
        transforms: log-probability transforms of mu, in order.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.TRANSITIONS}),
    }
    steps: int = eqx.field(static=True, default=1000)
    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def reverse_chain(self) -> ddiff.ReverseChain | None:
        """Steps from i/T to (i-1)/T for i = T..2, then x_0 ~ mu(x, 1/T) at every position."""
        top_p = ddiff.chain(*self.transforms).as_top_p()
        if top_p is None:
            return None
        times = jnp.arange(self.steps, 0, -1, dtype=jnp.int32).astype(jnp.float32) / self.steps
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=times, final="mean", top_p=top_p
        )

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        return index >= self.steps - 1

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        process = prediction.model.process
        t = (self.steps - index).astype(jnp.float32) / self.steps
        s = (self.steps - index - 1).astype(jnp.float32) / self.steps
        log_mean, calls = prediction.log_mean(tokens, t)
        log_probs = jax.vmap(lambda x_t, lm: process.log_posterior_from_mean(x_t, lm, s, t))(
            tokens, log_mean
        )
        return jax.vmap(ddiff.categorical)(keys, log_probs), carry, calls

    def finish(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, *,
        keys: ddiff.KeyBatch
    ) -> ddiff.SampleOutput:
        log_mean, calls = prediction.log_mean(tokens, jnp.asarray(1.0 / self.steps, jnp.float32))
        drawn = jax.vmap(ddiff.categorical)(keys, log_mean)
        return ddiff.SampleOutput(
            tokens=ddiff.apply_fixed(prediction.conditioning, drawn),
            num_function_evals=jnp.int32(calls),
        )
