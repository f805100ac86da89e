"""A table network: any function of (x_t, t, label), for exact references beyond the oracle.

The oracle (the exact denoiser) is a special model: a term of an objective that is wrong
but averages to zero under the true posterior, or a sampler that evaluates its network at
the wrong time while the network's prediction does not depend on t, is invisible with it.
A table network has an arbitrary output for every noisy sequence, label and time, so
nothing averages out; on a toy small enough to enumerate every noisy sequence (S^D of
them) the kit computes, for such a model, the exact value of a bound and the exact law of
a sampler's output (``ddiff.testing._bounds``, ``ddiff.testing._chains``).
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ddiff._capabilities import MEAN
from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._network import AbstractNetwork
from ddiff._parameterization import AbstractParameterization
from ddiff._process import AbstractForwardProcess
from ddiff._typing import Key, Label, NetworkOutput, Time, Tokens

MAX_STATES = 4096
"""The largest S^D a table network may hold (S states per position, D positions)."""


class TableNetwork(AbstractNetwork):
    """A network whose output is read from a table: for the noisy sequence x (index
    k = sum_n x^n S^(D-1-n)), the label row c (the label, or the null class
    ``num_classes`` for None) and time t,

        output = base[c, k] + (2 t - 1) slope[c, k]        (time conditioned)
        output = base[c, k]                                 (time independent).

    Attributes:
        base, slope: tables of shape (rows, S^D, D, channels); rows = num_classes + 1 for a
            class-conditional table (the last row is the null class), else 1.
        num_states: S.
        time_conditioned: whether the slope is used.
        num_classes: 0 for an unconditional table.
    """

    base: Float[Array, "rows states seq out"]
    slope: Float[Array, "rows states seq out"]
    num_states: int = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __check_init__(self):
        rows, count, seq_len, _ = self.base.shape
        if self.num_states**seq_len != count or self.slope.shape != self.base.shape:
            raise DdiffError(
                f"table network: base and slope must have shape (rows, S^D, D, channels) with "
                f"S = {self.num_states}, got {self.base.shape} and {self.slope.shape}"
            )
        if rows != (self.num_classes + 1 if self.num_classes > 0 else 1):
            raise DdiffError(
                f"table network: {rows} rows for num_classes = {self.num_classes} "
                f"(need num_classes + 1, or 1 when unconditional)"
            )

    def __call__(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> NetworkOutput:
        del key
        powers = self.num_states ** jnp.arange(x_t.shape[0] - 1, -1, -1)
        index = jnp.sum(x_t * powers)
        if self.num_classes == 0:
            row = 0
        else:
            row = self.num_classes if label is None else label
        output = self.base[row, index]
        if self.time_conditioned:
            output = output + (2.0 * t - 1.0) * self.slope[row, index]
        return output


def table_network(
    process: AbstractForwardProcess,
    parameterization: AbstractParameterization,
    seq_len: int,
    *,
    seed: int,
    num_classes: int = 0,
    time_conditioned: bool = True,
    scale: float | None = None,
    slope_scale: float | None = None,
) -> TableNetwork:
    """A random :class:`TableNetwork` for ``parameterization`` on ``process``: base entries
    N(0, scale^2), slopes N(0, slope_scale^2) (so an output moves by about 2 slope_scale
    over t in [0, 1]), drawn from ``seed``. By default both scales are 1.5 for a
    parameterization that provides a mean (logits), and 0.5 for one that reads its output
    as log concentration ratios only: near t = 1 the forward rates are large and the
    ratios close to 1, so wider random log ratios make the bound's estimate needlessly
    heavy-tailed."""
    reads_scores = MEAN not in parameterization.capabilities()
    default = 0.5 if reads_scores else 1.5
    scale = default if scale is None else scale
    slope_scale = default if slope_scale is None else slope_scale
    count = process.num_states**seq_len
    if count > MAX_STATES:
        raise DdiffError(
            f"table network: S^D = {count} noisy sequences is more than {MAX_STATES}; use a "
            f"smaller toy"
        )
    rows = num_classes + 1 if num_classes > 0 else 1
    shape = (rows, count, seq_len, parameterization.output_channels(process))
    rng = np.random.default_rng([seed, 15])
    base = scale * rng.standard_normal(shape)
    slope = slope_scale * rng.standard_normal(shape) if time_conditioned else np.zeros(shape)
    return TableNetwork(
        base=jnp.asarray(base, jnp.float32),
        slope=jnp.asarray(slope, jnp.float32),
        num_states=process.num_states,
        time_conditioned=time_conditioned,
        num_classes=num_classes,
    )


def table_model(
    process: AbstractForwardProcess,
    parameterization: AbstractParameterization,
    seq_len: int,
    *,
    seed: int,
    num_classes: int = 0,
    time_conditioned: bool = True,
) -> DiffusionModel:
    """A :class:`ddiff.DiffusionModel` with a random :func:`table_network`."""
    network = table_network(
        process, parameterization, seq_len, seed=seed, num_classes=num_classes,
        time_conditioned=time_conditioned,
    )
    return DiffusionModel(network=network, parameterization=parameterization, process=process)
