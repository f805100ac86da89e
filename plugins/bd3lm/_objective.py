"""The block-diffusion bound (Arriola et al., ICLR 2025, eq. 7)."""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

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


def _check_interval(name: str, interval: tuple[float, float]) -> None:
    low, high = interval
    if not 0.0 <= low < high <= 1.0:
        raise ddiff.RecipeError(
            f"{name} must be [beta, omega] with 0 <= beta < omega <= 1, got {list(interval)}",
            path=name,
        )


def allowed_counts(size: int, clip: tuple[float, float]) -> np.ndarray:
    """Which masked counts k = 0..L' of a block BD3-LM's resampling accepts: those whose
    fraction k / L' is neither below beta nor above omega (``_resample_q_xt``)."""
    fraction = np.arange(size + 1) / size
    return ~(fraction < clip[0]) & ~(fraction > clip[1])


def block_keep(
    key: ddiff.Key, alpha: jax.Array, size: int, clip: tuple[float, float] | None
) -> jax.Array:
    """Which positions of x_t keep their clean token, shape (blocks * size,), for blocks
    whose tokens are kept with probabilities ``alpha`` (one per block): independently, or
    with ``clip`` the same draw conditioned on each block's masked fraction lying in
    [beta, omega] (BD3-LM's resampling, which redraws a block's mask until it does): the
    masked count k drawn with probability proportional to C(L', k) (1 - alpha)^k
    alpha^(L' - k) over the accepted counts, then a uniformly random k-subset masked."""
    blocks = alpha.shape[0]
    uniform = jax.random.uniform(key, (blocks * size,)).reshape(blocks, size)
    if clip is None:
        return (uniform < alpha[:, None]).reshape(-1)
    counts = np.arange(size + 1)
    log_binomial = jnp.asarray([math.lgamma(size + 1) - math.lgamma(k + 1) - math.lgamma(size - k + 1) for k in counts])
    logits = log_binomial + counts * jnp.log1p(-alpha)[:, None] + (size - counts) * jnp.log(alpha)[:, None]
    logits = jnp.where(jnp.asarray(allowed_counts(size, clip)), logits, -jnp.inf)
    masked = ddiff.categorical(jax.random.fold_in(key, 1), logits)
    rank = jnp.argsort(jnp.argsort(uniform, axis=-1), axis=-1)
    return (rank >= masked[:, None]).reshape(-1)


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

    As BD3-LM's code trains (kuleshov-group/bd3lms, ``diffusion.py``; all off by default):

    - ``resample``: while training with a clip, each block's mask is drawn conditioned on
      its masked fraction lying in [beta, omega] (``training.resample``;
      :func:`block_keep`). The loss then estimates E_{t ~ U[beta, omega]}
      E_{x_t ~ q(x_t | x, t; masked fraction in [beta, omega])}[w(t) CE(x_t)], neither the
      bound nor the clipped integrand's average: a training objective only.
    - ``ignore_bos``: position 0 is never masked (``algo.ignore_bos``), so its term is 0
      and the reconstruction and prior terms cover positions 1..D-1.
    - ``weight_rule: bd3lm``: the weight alpha'/(1 - alpha) (-1/t for the linear schedule)
      becomes -1 when the interval in use starts above 0.5, as the reference's
      ``loss_scale``.
    - ``eval_interval: [1e-3, 1]``: held-out evaluation averages the integrand over t in
      that interval, as its validation does (its number is the bound's integral over
      [1e-3, 1] divided by 0.999); [0, 1] (default) is the bound.
    - ``loss_reduction: token_mean``: the training loss is the bound's estimate divided by
      D, so the batch mean is the mean over the batch's tokens (the reference's
      ``nlls.sum() / attention_mask.sum()`` on its packed, unpadded sequences, BOS
      included while training): the gradient, its norm and so ``grad_clip`` are on the
      reference's scale. ``nelbo`` stays in nats per sequence.

    Attributes:
        block_size: L', a divisor of the data's sequence length D.
        clip: [beta, omega], 0 <= beta < omega <= 1: the training interval of t.
        resample: condition each block's mask on its masked fraction in ``clip``.
        ignore_bos: never mask position 0.
        weight_rule: ``bound`` (alpha'/(1 - alpha)) or ``bd3lm`` (-1 above beta = 0.5).
        eval_interval: the interval of t held-out evaluation averages over.
        loss_reduction: ``sequence`` (nats per sequence) or ``token_mean`` (per token).
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
    resample: bool = eqx.field(static=True, default=False)
    ignore_bos: bool = eqx.field(static=True, default=False)
    weight_rule: Literal["bound", "bd3lm"] = eqx.field(static=True, default="bound")
    eval_interval: tuple[float, float] = eqx.field(static=True, default=(0.0, 1.0))
    loss_reduction: Literal["sequence", "token_mean"] = eqx.field(static=True, default="sequence")

    def __check_init__(self):
        _check_blocks(self.block_size, self.seq_len)
        _check_interval("clip", self.clip)
        _check_interval("eval_interval", self.eval_interval)
        if self.resample and tuple(self.clip) == (0.0, 1.0):
            raise ddiff.RecipeError(
                "resample conditions masks on a clip and clip is [0, 1]; set clip (BD3-LM: "
                "[0.3, 0.8]) or resample: false",
                path="resample",
            )
        if self.resample and not allowed_counts(self.block_size, self.clip).any():
            raise ddiff.RecipeError(
                f"no masked count of a block of {self.block_size} has its fraction in "
                f"{list(self.clip)}; widen clip",
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
        low, high = self.clip if train else self.eval_interval
        if size == 1:
            x_t = jnp.full_like(x0, mask_id)
            weight = schedule.alpha(jnp.ones(())) - schedule.alpha(jnp.zeros(()))
        else:
            fraction = jnp.mod(t + jnp.arange(blocks) / blocks, 1.0)
            times = low + (high - low) * fraction
            alpha = jax.vmap(schedule.alpha)(times)
            weight = jax.vmap(schedule.alpha_derivative)(times) / (1.0 - alpha)
            if self.weight_rule == "bd3lm" and low > 0.5:
                weight = -jnp.ones_like(weight)
            clip = self.clip if self.resample and train else None
            x_t = jnp.where(block_keep(noise_key, alpha, size, clip), x0, mask_id)
        if self.ignore_bos:
            x_t = x_t.at[0].set(x0[0])
        log_mean = model.block_causal_log_mean(x_t, x0, block_size=size, label=label, key=network_key)
        picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
        masked = jnp.where(x_t == mask_id, picked, 0.0).reshape(blocks, size).sum(axis=-1)
        per_block = weight * masked
        terms = ddiff.bound_terms(model, x0[1:] if self.ignore_bos else x0, jnp.sum(per_block))
        per_token = per_block / size
        variance = jnp.var(per_token, ddof=1) if blocks > 1 else jnp.zeros(())
        loss = terms.loss / x0.shape[0] if self.loss_reduction == "token_mean" else terms.loss
        return ddiff.ObjectiveTerms(
            loss=loss,
            nelbo=terms.nelbo,
            metrics={**terms.metrics, "block_loss_variance": variance},
        )
