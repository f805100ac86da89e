"""The Weighting protocol: how a continuous-time objective's training loss is made from
its bound, without changing the bound."""

import jax
from equinox import AbstractVar

from ddiff._capabilities import Capable
from ddiff._errors import DdiffError, check_at_least
from ddiff._objective import ObjectiveTerms
from ddiff._process import AbstractForwardProcess
from ddiff._typing import AbstractCheckedModule, Scalar, Time


class AbstractWeighting(AbstractCheckedModule, Capable):
    """A training weighting of a continuous-time bound (the ``weighting:`` key of the
    objectives that accept one). With the bound's estimate written as

        nelbo = diffusion + reconstruction + prior,    diffusion ~ int_0^1 L_t dt,

    and the objective's own loss ``surrogate`` (the bound, plus e.g. GenMD4's REINFORCE
    term), the weighting trains on (:func:`weighted_terms`)

        loss = surrogate + (rho(t) - 1) diffusion + lambda CE,
        CE = -sum_n log mu_theta(x_t, t)[n, x_0^n],

    an estimate of int_0^1 rho(t) L_t dt + reconstruction + prior + lambda E_t[CE]:
    ``rho`` (:meth:`diffusion_weight`, 1 by default) re-weights the bound's integrand in
    time, ``lambda`` (:attr:`cross_entropy`) adds the auxiliary cross-entropy of D3PM's
    hybrid loss and tauLDR's ``nll_weight``, at the objective's own draw x_t. ``nelbo``,
    and with it every evaluation, stays the bound.
    """

    cross_entropy: AbstractVar[float]

    def __check_init__(self):
        check_at_least("cross_entropy", self.cross_entropy, 0)

    def diffusion_weight(self, process: AbstractForwardProcess, t: Time) -> Scalar | None:
        """rho(t) >= 0, the factor on the diffusion term's integrand at time t, or None
        for 1 (the bound's own weighting, the default)."""
        return None


def weighted_terms(
    weighting: AbstractWeighting | None,
    terms: ObjectiveTerms,
    *,
    process: AbstractForwardProcess,
    t: Time,
    cross_entropy: Scalar | None,
    network_diffusion: Scalar | None = None,
) -> ObjectiveTerms:
    """``terms`` with the loss of ``weighting`` (:class:`AbstractWeighting`); ``nelbo``
    is returned unchanged, and ``terms`` itself when ``weighting`` is None.

    Arguments:
        weighting: the objective's weighting, or None (train on ``terms.loss``).
        terms: the objective's terms at time t, with ``metrics["diffusion"]``.
        process: the model's forward process (read by ``diffusion_weight``).
        t: the process time of the draw.
        cross_entropy: -sum_n log mu_theta(x_t, t)[n, x_0^n] at the objective's draw x_t
            (added to the metrics as ``cross_entropy``), or None where the model has no
            clean-token posterior (then a weighting with a cross-entropy is an error; the
            objective's ``pairing_problem`` refuses it at load time).
        network_diffusion: the diffusion estimate with the schedule's gradient stopped,
            for an objective whose schedule is learnable (GenMD4): the re-weighting then
            reaches the network only and the schedule keeps the bound's gradient.
            Default: ``metrics["diffusion"]``.
    """
    if weighting is None:
        return terms
    loss = terms.loss
    rho = weighting.diffusion_weight(process, t)
    if rho is not None:
        diffusion = terms.metrics["diffusion"] if network_diffusion is None else network_diffusion
        loss = loss + (jax.lax.stop_gradient(rho) - 1.0) * diffusion
    if cross_entropy is None:
        if weighting.cross_entropy:
            raise DdiffError(
                f"{type(weighting).__name__} has cross_entropy={weighting.cross_entropy} but the "
                f"objective has no cross-entropy to add (its model gives no clean-token posterior)"
            )
        return ObjectiveTerms(loss=loss, nelbo=terms.nelbo, metrics=terms.metrics)
    if weighting.cross_entropy:
        loss = loss + weighting.cross_entropy * cross_entropy
    metrics = {**terms.metrics, "cross_entropy": cross_entropy}
    return ObjectiveTerms(loss=loss, nelbo=terms.nelbo, metrics=metrics)
