"""The autoregressive negative log-likelihood, sum_n -log p(x_n | x_<n)."""

import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.autoregressive._process import CAUSAL, EXACT_LIKELIHOOD, LEFT_TO_RIGHT


def prefix_state(x0: ddiff.Tokens, visible: jax.Array, mask_id: int) -> ddiff.Tokens:
    """x0 with its first ``visible`` positions kept and the rest masked: the state of the
    ``left_to_right`` process at t = 1 - visible / D."""
    return jnp.where(jnp.arange(x0.shape[0]) < visible, x0, mask_id)


class NextTokenNLL(ddiff.AbstractObjective):
    """The exact negative log-likelihood of an autoregressive model,

        -log p_theta(x_0) = -sum_n log mu_theta(x_t_n, t_n)[n, x_0^n],  t_n = 1 - n/D,

    where x_t_n shows the first n positions (the ``left_to_right`` process's D-step bound,
    which has no gap: each step reveals one known position). For a causal network that
    ignores t all D terms come from one call on x_0 (its output row n equals the row it
    gives at x_t_n, where position n is masked); any other network is called at each
    x_t_n. Its ``nelbo`` is exact (capability ``exact_likelihood``): one time draw per
    sequence suffices in evaluation.
    """

    provides = frozenset({EXACT_LIKELIHOOD})
    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({LEFT_TO_RIGHT}),
    }

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
        process = model.process
        seq_len = x0.shape[0]
        network_key = key if train else None
        network_caps = model.network.capabilities()
        if CAUSAL in network_caps and caps.TIME_INDEPENDENT in network_caps:
            output = model.network_output(x0, jnp.ones(()), label=label, key=network_key)
            all_masked = jnp.full_like(x0, process.mask_id)
            log_mean = model.parameterization.log_mean(output, all_masked, jnp.ones(()), process)
        else:

            def row(n):
                time = 1.0 - n.astype(jnp.float32) / seq_len
                state = prefix_state(x0, n, process.mask_id)
                return model.log_mean(state, time, label=label, key=network_key)[n]

            log_mean = jax.vmap(row)(jnp.arange(seq_len))
        picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
        nll = -jnp.sum(picked)
        return ddiff.ObjectiveTerms(loss=nll, nelbo=nll, metrics={"nll": nll})
