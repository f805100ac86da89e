"""The block-diffusion bound (Arriola et al., ICLR 2025, eq. 7)."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps


def _check_blocks(block_size: int, seq_len: int) -> None:
    ddiff.check_at_least("block_size", block_size)
    if seq_len % block_size:
        raise ddiff.RecipeError(
            f"{block_size} does not divide the data's sequence length {seq_len}; choose a "
            f"divisor of {seq_len}",
            path="block_size",
        )


class BD3LMELBO(ddiff.AbstractObjective):
    """The block diffusion bound (Arriola et al. 2025, eq. 7): with B = D / L' blocks,

        L_BD(x) = sum_b int_0^1 alpha'_t / (1 - alpha_t)
                  E_q[ sum_{n in b: x_t^n = m} log mu_theta(x_t^b, x^{<b})[n, x^n] ] dt
                  + reconstruction + prior,

    MD4's continuous-time ELBO of every block given the clean blocks before it, all blocks
    in one vectorised network pass over [x_t, x] (``md4_transformer``'s
    ``block_causal_mask``). Block b draws its own time t_b = (t + b/B) mod 1 from the
    example's antithetic time t, so the blocks of a sequence cover [0, 1] evenly; x_t
    masks position n of block b when U_n >= alpha(t_b). The reconstruction and prior terms
    factorise over positions, so they are MD4's. Reported in nats per sequence.

    With L' = 1 the time integral is done exactly: a one-token block is either clean (no
    term) or masked, so its term is (alpha_0 - alpha_1) (-log mu[n, x^n]) with every
    position masked: the autoregressive negative log-likelihood of the network read
    causally, without Monte Carlo noise (scaled by 1 - 2 eps of the clipping).

    Clipped ("data-driven") schedules (sec. 4): while training (``train=True``) with
    ``clip = [beta, omega]`` other than [0, 1], t_b is drawn in [beta, omega] instead
    (with the linear schedule, the paper's, the fraction of masked tokens), which lowers the
    variance of the gradient estimate; the loss (and the ``nelbo`` the training log shows)
    is then the average of the bound's integrand over that interval, not a bound. Held-out
    evaluation (``train=False``) always integrates over [0, 1]: the bound. The metric
    ``block_loss_variance`` is the variance across a sequence's blocks of the per-token
    loss of each block (nats^2), the quantity the clip is chosen to make small.

    Attributes:
        block_size: L', a divisor of the data's sequence length D.
        clip: [beta, omega], 0 <= beta < omega <= 1: the training interval of t.
        seq_len: D (set by ddiff from the data).
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
        "network": frozenset({caps.BLOCK_CAUSAL, caps.TIME_INDEPENDENT}),
    }
    block_size: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    clip: tuple[float, float] = eqx.field(static=True, default=(0.0, 1.0))

    def __check_init__(self):
        _check_blocks(self.block_size, self.seq_len)
        low, high = self.clip
        if not 0.0 <= low < high <= 1.0:
            raise ddiff.RecipeError(
                f"clip must be [beta, omega] with 0 <= beta < omega <= 1, got {list(self.clip)}",
                path="clip",
            )

    def bound_form(self) -> ddiff.BoundForm | None:
        """None: the conformance kit's exact per-x_0 references are bounds of a denoiser of
        the whole sequence, while this bound conditions each block on the clean blocks
        before it. Its exact values are checked by enumeration in ddiff's own tests (equal
        to MD4's ELBO with one block, to the autoregressive likelihood with L' = 1)."""
        return None

    def example_terms(
        self, model: ddiff.DiffusionModel, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key,
        label: ddiff.Label | None = None, train: bool = True
    ) -> ddiff.ObjectiveTerms:
        process = model.process
        schedule = process.schedule
        mask_id = process.mask_id
        size = self.block_size
        blocks = x0.shape[0] // size
        noise_key, network_key = jax.random.split(key)
        network_key = network_key if train else None
        if size == 1:
            x_t = jnp.full_like(x0, mask_id)
            weight = schedule.alpha(jnp.ones(())) - schedule.alpha(jnp.zeros(()))
        else:
            low, high = self.clip if train else (0.0, 1.0)
            fraction = jnp.mod(t + jnp.arange(blocks) / blocks, 1.0)
            times = low + (high - low) * fraction
            alpha = jax.vmap(schedule.alpha)(times)
            weight = jax.vmap(schedule.alpha_derivative)(times) / (1.0 - alpha)
            keep = jax.random.uniform(noise_key, x0.shape) < jnp.repeat(alpha, size)
            x_t = jnp.where(keep, x0, mask_id)
        log_mean = model.block_causal_log_mean(x_t, x0, block_size=size, label=label, key=network_key)
        picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
        masked = jnp.where(x_t == mask_id, picked, 0.0).reshape(blocks, size).sum(axis=-1)
        per_block = weight * masked
        terms = ddiff.bound_terms(model, x0, jnp.sum(per_block))
        per_token = per_block / size
        variance = jnp.var(per_token, ddof=1) if blocks > 1 else jnp.zeros(())
        return ddiff.ObjectiveTerms(
            loss=terms.loss,
            nelbo=terms.nelbo,
            metrics={**terms.metrics, "block_loss_variance": variance},
        )
