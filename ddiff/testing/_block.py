"""Exact block-diffusion conditionals of a toy distribution, by enumeration.

For blocks of L' positions (block b(n) = n // L'), clean earlier blocks x_0^{<b} and the
noisy block x_t^b of a factorized forward process,

    p(x_0 | x_t^b, x_0^{<b}) proportional to p(x_0) [x_0^{<b} as given] prod_{n in b} q(x_t^n | x_0^n),

the later blocks summed out; its marginals at the positions of block b are the exact
block denoiser mu[n, v] = p(x_0^n = v | x_t^b, x_0^{<b}).
"""

import jax
import jax.numpy as jnp

from ddiff._numerics import safe_log
from ddiff._process import AbstractForwardProcess
from ddiff._typing import Label, LogProbs, Time, Tokens
from ddiff.testing._toy import ToyDistribution

_IMPOSSIBLE = -1e30


def _log(probs: jax.Array) -> jax.Array:
    return jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), _IMPOSSIBLE)


def exact_block_log_denoiser(
    distribution: ToyDistribution,
    process: AbstractForwardProcess,
    x_t: Tokens,
    x0: Tokens,
    block_size: int,
    t: Time,
    label: Label | None = None,
) -> LogProbs:
    """log p(x_0^n = v | x_t^b, x_0^{<b}) at every position n (of block b = n //
    ``block_size``) and clean value v, every block at once: the exact output of a
    block-causal network (:class:`ddiff.AbstractBlockCausalNetwork`) on ``x_t`` (read in
    block b) and ``x0`` (read in the blocks before b), the noisy tokens at time t. Earlier
    blocks that no sequence of the toy continues give the prior's marginals instead."""
    seq_len, vocab = distribution.seq_len, distribution.vocab_size
    sequences = distribution.sequences()
    features = jax.nn.one_hot(sequences, vocab).reshape(sequences.shape[0], -1)
    values = jnp.arange(process.vocab_size)
    rows = jax.vmap(lambda v: process.marginal_probs(jnp.full((seq_len,), v), t))(values)
    noisy = _log(jnp.einsum("vns,ns->nv", rows, jax.nn.one_hot(x_t, process.num_states)))
    clean = jnp.where(jax.nn.one_hot(x0, vocab, dtype=bool), 0.0, _IMPOSSIBLE)
    log_prior = distribution.sequence_log_probs(label)
    log_prior = jnp.where(jnp.isfinite(log_prior), log_prior, _IMPOSSIBLE)
    block = jnp.arange(seq_len) // block_size

    def one_block(b):
        observed = jnp.where((block < b)[:, None], clean, jnp.where((block == b)[:, None], noisy, 0.0))
        joint = log_prior + features @ observed.reshape(-1)
        possible = jnp.max(joint) > 0.5 * _IMPOSSIBLE
        posterior = jnp.exp(jax.nn.log_softmax(jnp.where(possible, joint, log_prior)))
        return (posterior @ features).reshape(seq_len, vocab)

    means = jax.vmap(one_block)(jnp.arange(-(-seq_len // block_size)))
    return safe_log(means[block, jnp.arange(seq_len)])
