"""ReMDM remasking (Wang et al. 2025)."""

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

RemaskingSchedule = Literal["cap", "rescale", "loop"]
"""ReMDM's remasking schedules (Wang et al. 2025, sec. 4.1 and their code)."""


def remdm_logits(
    log_mean: ddiff.LogProbs, x: ddiff.Tokens, mask_id: int, alpha_s, alpha_t, sigma
) -> jax.Array:
    """Log-probabilities over the V+1 outcomes of every position of one sequence for one
    ReMDM step from t to s < t (Wang et al. 2025, eq. 6 with x_0 replaced by mu_theta):

        decoded z_t = v:  (1 - sigma) onehot(v) + sigma onehot(m),
        masked z_t = m:   (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t) mu
                          + (1 - alpha_s - sigma alpha_t) / (1 - alpha_t) onehot(m),

    valid for 0 <= sigma <= min(1, (1 - alpha_s) / alpha_t); it keeps the marginal
    q(z_s given x_0) of every position, and sigma = 0 is MD4's ancestral step (Alg. 2),
    written so that it agrees with it bit for bit."""
    log_unmask = jnp.log(jnp.maximum(alpha_s - (1.0 - sigma) * alpha_t, 0.0)) - jnp.log1p(-alpha_t)
    log_stay = jnp.log1p(-(alpha_s + sigma * alpha_t)) - jnp.log1p(-alpha_t)
    masked_row = jnp.concatenate(
        [log_unmask + log_mean, jnp.broadcast_to(log_stay, (x.shape[0], 1))], axis=-1
    )
    keep = jax.nn.one_hot(x, mask_id + 1, dtype=bool)
    decoded_row = jnp.where(keep, jnp.log1p(-sigma), -jnp.inf)
    decoded_row = decoded_row.at[:, mask_id].set(jnp.log(sigma))
    return jnp.where((x == mask_id)[:, None], masked_row, decoded_row)


class ReMDMSampler(ddiff.AbstractGridSampler):
    """ReMDM remasking (Wang et al. 2025, arXiv 2503.00307): ancestral sampling on a time
    grid in which a decoded token is remasked with probability sigma_t at every step and
    a masked position unmasks correspondingly more often (:func:`remdm_logits`), so that
    errors made early can be revised. sigma_t <= sigma_max = min(1, (1 - alpha_s) /
    alpha_t), and the schedules are those of the paper's code:

    - ``cap``: sigma_t = min(eta, sigma_max) (their eta 0.008);
    - ``rescale``: sigma_t = eta sigma_max, eta in [0, 1] (their eta 0.015);
    - ``loop``: three phases on the grid time tau: from tau = 1 to ``t_on`` plain
      ancestral steps with alpha rising linearly from alpha_1 to ``alpha_on``; from
      ``t_on`` to ``t_off`` alpha held at ``alpha_on`` while tokens are remasked with
      sigma = min(eta, sigma_max) and unmasked at the rate that keeps alpha there; then
      ancestral steps with alpha rising linearly to alpha_0 at tau = 0 (their eta 0.02,
      t_on 0.55, t_off 0.05, alpha_on 0.9). The network is evaluated at the time where
      the schedule reaches the loop's alpha (:func:`ddiff.time_of_alpha`).

    The steps run on the driver's grid (:class:`ddiff.AbstractGridSampler`): the reverse
    process starts from all-mask, and positions still masked after the last step are drawn
    from mu_theta(x, 0) (the grid samplers' finish). With eta = 0 under ``cap`` or
    ``rescale`` it is ``ancestral``, bit for bit with the same keys.

    Distribution: a heuristic that is not the model's distribution. A remasking step keeps
    each position's marginal, but with sigma > 0 several positions unmask per step from
    one prediction however many steps are taken, so even an exact denoiser is sampled
    with the factorization error that ancestral sampling only has at few steps; the paper
    trades it (and diversity) for quality at many steps. Exact for eta = 0 as T grows,
    and for any eta when positions are independent.

    Attributes:
        steps: grid steps T (network evaluations: T, or T+1 when a position is still
            masked at the end; doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
        strategy: ``cap``, ``rescale`` or ``loop``.
        eta: the remasking strength.
        t_on, t_off, alpha_on: the loop's phase boundaries and its held alpha.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
    }
    strategy: RemaskingSchedule = eqx.field(static=True, default="loop")
    eta: float = eqx.field(static=True, default=0.02)
    t_on: float = eqx.field(static=True, default=0.55)
    t_off: float = eqx.field(static=True, default=0.05)
    alpha_on: float = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        ddiff.check_at_least("eta", self.eta, 0.0)
        if self.strategy == "rescale" and self.eta > 1.0:
            raise ddiff.RecipeError(f"eta must be in [0, 1] under rescale, got {self.eta}", path="eta")
        if not 0.0 <= self.t_off < self.t_on <= 1.0:
            raise ddiff.RecipeError(
                f"the loop needs 0 <= t_off < t_on <= 1, got t_off={self.t_off}, t_on={self.t_on}",
                path="t_on",
            )
        if not 0.0 < self.alpha_on < 1.0:
            raise ddiff.RecipeError(f"alpha_on must be in (0, 1), got {self.alpha_on}", path="alpha_on")

    def _loop_alpha(self, schedule: ddiff.AbstractSchedule, tau: jax.Array) -> jax.Array:
        """The loop's survival probability at grid time tau."""
        alpha_0, alpha_1 = schedule.alpha(jnp.zeros(())), schedule.alpha(jnp.ones(()))
        rising = alpha_1 + (self.alpha_on - alpha_1) * (1.0 - tau) / max(1.0 - self.t_on, 1e-12)
        ending = self.alpha_on + (alpha_0 - self.alpha_on) * (self.t_off - tau) / max(self.t_off, 1e-12)
        return jnp.where(tau > self.t_on, rising, jnp.where(tau <= self.t_off, ending, self.alpha_on))

    def _step_parameters(self, schedule, t, s):
        """(network time, alpha_s, alpha_t, sigma) of the step from t to s."""
        if self.strategy == "loop":
            alpha_t, alpha_s = self._loop_alpha(schedule, t), self._loop_alpha(schedule, s)
            time = ddiff.time_of_alpha(schedule, alpha_t)
        else:
            alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
            time = t
        sigma_max = jnp.minimum(1.0, (1.0 - alpha_s) / alpha_t)
        if self.strategy == "rescale":
            sigma = self.eta * sigma_max
        else:
            sigma = jnp.minimum(self.eta, sigma_max)
        if self.strategy == "loop":
            sigma = jnp.where((t <= self.t_on) & (t > self.t_off), sigma, 0.0)
        return time, alpha_s, alpha_t, sigma

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, t: ddiff.Time,
        s: ddiff.Time, *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        """Every position drawn from :func:`remdm_logits` (the driver sets the given ones
        again)."""
        process = prediction.model.process
        time, alpha_s, alpha_t, sigma = self._step_parameters(process.schedule, t, s)
        log_mean, calls = prediction.log_mean(tokens, time)
        logits = jax.vmap(lambda lm, x: remdm_logits(lm, x, process.mask_id, alpha_s, alpha_t, sigma))(
            log_mean, tokens
        )
        return jax.vmap(ddiff.categorical)(keys, logits), carry, calls
