"""MD4's continuous-time bound in its any-order form, as a ddiff plugin.

For a network that ignores t, the masked-diffusion ELBO depends on x_t only through the
set of masked positions, so the integral over time can be done in closed form given the
number of masks k (Hoogeboom et al. 2022, ARDM; Ou et al. 2024, RADD). What remains is an
average over k and over which k positions are masked, with bounded weights.
"""

# --8<-- [start:imports]
import jax
import jax.numpy as jnp
from jax.scipy.special import betainc

import ddiff
from ddiff import capabilities as caps

# --8<-- [end:imports]


# --8<-- [start:weight]
def mask_count_weight(
    schedule: ddiff.AbstractSchedule, num_masked: jax.Array, seq_len: int
) -> jax.Array:
    """w_k = int_0^1 -alpha'_t / (1 - alpha_t) P(k masks at t) dt, the weight of the
    positions' cross-entropies when k of the D positions are masked.

    With a = alpha_t and P(k masks at t) = C(D, k) (1 - a)^k a^(D - k),

        w_k = C(D, k) int_{alpha_1}^{alpha_0} (1 - a)^(k - 1) a^(D - k) da
            = (1 / k) [I_{alpha_0}(D - k + 1, k) - I_{alpha_1}(D - k + 1, k)],

    with I the regularized incomplete beta function. It depends on the schedule only
    through its end points; for alpha_0 = 1 and alpha_1 = 0 it is 1 / k.

    Arguments:
        schedule: a scalar schedule.
        num_masked: k, between 1 and D.
        seq_len: D.
    """
    k = jnp.asarray(num_masked, jnp.float32)
    alpha_0, alpha_1 = schedule.alpha(jnp.zeros(())), schedule.alpha(jnp.ones(()))
    a, b = seq_len - k + 1.0, k
    return (betainc(a, b, alpha_0) - betainc(a, b, alpha_1)) / k


# --8<-- [end:weight]


# --8<-- [start:class]
class AnyOrderELBO(ddiff.AbstractObjective):
    """MD4's negative ELBO (MD4 eq. 5) for a network that ignores t, with the time
    integrated out given the number of masked positions:

        L = sum_{k=1}^{D} w_k E_{S ~ U(k-subsets)}[ sum_{n in S} -log mu_theta(x_S)[n, x_0^n] ]
            + reconstruction + prior,

    where x_S is x_0 with the positions S masked and w_k is :func:`mask_count_weight`.
    Each example draws k = ceil(D t) from its antithetic time t (so k is uniform on
    1..D and stratified across the batch) and one k-subset, and returns D w_k times its
    masked cross-entropy. Its expectation is that of ``md4_elbo`` for the same model,
    but every example has exactly k masks and weights at most D / k, where MD4's
    estimator draws the number of masks and weighs it by alpha'_t / (1 - alpha_t).

    The identity needs a network whose output does not depend on t (``requires``
    ``time_independent``), which is exact for a masked process with a scalar schedule:
    p(x_0 | x_t) depends only on which positions are masked.
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
        "network": frozenset({caps.TIME_INDEPENDENT}),
    }
    # --8<-- [end:class]

    # --8<-- [start:terms]
    def example_terms(
        self,
        model: ddiff.DiffusionModel,
        x0: ddiff.Tokens,
        t: ddiff.Time,
        *,
        key: ddiff.Key,
        label: ddiff.Label | None = None,
        train: bool = True,
    ) -> ddiff.ObjectiveTerms:
        process = model.process
        seq_len = x0.shape[0]
        num_masked = jnp.clip(jnp.ceil(t * seq_len), 1, seq_len).astype(jnp.int32)
        subset_key, network_key = jax.random.split(key)
        masked = jax.random.permutation(subset_key, jnp.arange(seq_len) < num_masked)
        x_t = jnp.where(masked, process.mask_id, x0)
        log_mean = model.log_mean(x_t, t, label=label, key=network_key if train else None)
        picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
        cross_entropy = -jnp.sum(jnp.where(masked, picked, 0.0))
        weight = seq_len * mask_count_weight(process.schedule, num_masked, seq_len)
        return ddiff.bound_terms(model, x0, weight * cross_entropy)

    # --8<-- [end:terms]


# --8<-- [start:hook]
@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("objective", "any_order_elbo", AnyOrderELBO)


# --8<-- [end:hook]
