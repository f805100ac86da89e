"""Process tables: a forward process's primitives on a toy, in float64 numpy.

The exact references (``_predictions``, ``_chains``, ``_bounds``) are computed from a few
primitives of the forward process only: its marginals q_t(y | v) (``marginal_probs``),
its transition matrices Q_{s->t} (``transition_probs``), its prior and (for a score
sampler's final Tweedie draw only) its Tweedie denoiser. The forward rates are the time
derivative of the transitions, R_t = d/du Q_{t->u} at u = t (automatic differentiation of
the schedule's alpha, never its ``alpha_derivative``). Each primitive is one compiled
function per process type, evaluated 16 times at a time.
"""

import dataclasses
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._capabilities import RATES, TRANSITIONS
from ddiff._errors import DdiffError
from ddiff._process import AbstractForwardProcess

_CHUNK = 16
"""Times are evaluated 16 at a time, so that one compiled function serves any count."""


def _float64(tree):
    """A float64 copy of every floating-point array (through numpy: no compilation)."""
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a, np.float64)) if eqx.is_inexact_array(a) else a, tree
    )


def noisy_states(num_states: int, seq_len: int) -> np.ndarray:
    """Every sequence over S states, in lexicographic order (index sum_n x^n S^(D-1-n))."""
    return np.asarray(list(itertools.product(range(num_states), repeat=seq_len)), np.int64)


def _powers(base: int, seq_len: int) -> np.ndarray:
    return base ** np.arange(seq_len - 1, -1, -1)


def _log(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(values)


def _onehot(states: np.ndarray, size: int) -> np.ndarray:
    return np.eye(size)[states]


def _in_chunks(fn, leading: tuple, *columns) -> np.ndarray:
    """fn(*leading, *chunks) for the equal-length 1-D ``columns`` (times) in chunks of 16,
    the last chunk padded with each column's final entry; float64, stacked along axis 0."""
    columns = [np.asarray(column, np.float64) for column in columns]
    count = len(columns[0])
    pad = (-count) % _CHUNK
    chunked = [np.concatenate([c, np.full(pad, c[-1])]).reshape(-1, _CHUNK) for c in columns]
    parts = [
        np.asarray(fn(*leading, *(jnp.asarray(c, jnp.float64) for c in chunk)), np.float64)
        for chunk in zip(*chunked, strict=True)
    ]
    return np.concatenate(parts, axis=0)[:count]


# --------------------------------------------------------------------------- jax, once per type


@eqx.filter_jit
def _marginals(process, times):
    values = jnp.arange(process.vocab_size)
    return jax.vmap(lambda t: process.marginal_probs(values, t))(times)


@eqx.filter_jit
def _transitions(process, starts, ends):
    states = jnp.arange(process.num_states)
    return jax.vmap(lambda s, t: process.transition_probs(states, s, t))(starts, ends)


@eqx.filter_jit
def _rates(process, times):
    states = jnp.arange(process.num_states)
    if TRANSITIONS in process.capabilities():

        def one(t):
            _, tangent = jax.jvp(
                lambda u: process.transition_probs(states, t, u), (t,), (jnp.ones_like(t),)
            )
            return tangent

    else:

        def one(t):
            return process.forward_rates(states, t)

    return jax.vmap(one)(times)


@eqx.filter_jit
def _prior(process):
    return process.prior_probs()


@eqx.filter_jit
def _process_tweedie(process, log_scores, states, t):
    return jax.vmap(lambda ls, x: process.log_mean_from_score(ls, x, t))(log_scores, states)


# --------------------------------------------------------------------------- process tables


@dataclasses.dataclass(frozen=True)
class _Process:
    """A float64 copy of a process and the sizes the references need."""

    process: AbstractForwardProcess
    seq_len: int

    @property
    def vocab_size(self) -> int:
        return self.process.vocab_size

    @property
    def num_states(self) -> int:
        return self.process.num_states

    def marginals(self, times) -> np.ndarray:
        """q_t(y | v): shape (times, V, S)."""
        return _in_chunks(_marginals, (self.process,), times)

    def transitions(self, starts, ends) -> np.ndarray:
        """Q_{s->t}(i, j) = q(x_t = j | x_s = i): shape (pairs, S, S)."""
        return _in_chunks(_transitions, (self.process,), starts, ends)

    def rates(self, times) -> np.ndarray:
        """R_t(i -> j) = d/du Q_{t->u}(i, j) at u = t: shape (times, S, S)."""
        if RATES not in self.process.capabilities() and TRANSITIONS not in self.process.capabilities():
            raise DdiffError(
                f"the reference needs forward rates or transitions of process "
                f"{type(self.process).__name__}"
            )
        return _in_chunks(_rates, (self.process,), times)

    def prior(self) -> np.ndarray:
        return np.asarray(_prior(self.process), np.float64)

    def tweedie(self, log_scores: np.ndarray, states: np.ndarray, time: float) -> np.ndarray:
        """The process's Tweedie denoiser, log mu from log s at every state: (N, D, V)."""
        log_mean = _process_tweedie(
            self.process, jnp.asarray(log_scores), jnp.asarray(states), jnp.asarray(time, jnp.float64)
        )
        return np.asarray(log_mean, np.float64)


def _as_process(process: AbstractForwardProcess, seq_len: int) -> _Process:
    return _Process(_float64(process), seq_len)
