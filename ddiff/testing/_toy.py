"""Enumerable toy distributions over V^D sequences with exact log-probabilities."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ddiff._categorical import categorical
from ddiff._errors import DdiffError
from ddiff._typing import Key, Label, Scalar, Tokens
from ddiff.testing._process_tables import noisy_states

MAX_SEQUENCES = 4096
"""The largest V^D a toy distribution may enumerate."""


class ToyDistribution(eqx.Module):
    """A distribution over all V^D sequences, given by a table of log-probabilities, and
    optionally one table per class (class-conditional data).

    Sequences are enumerated in lexicographic order: sequence k has digits k in base V,
    most significant first. Zero-probability sequences have log-probability -inf.

    Attributes:
        log_probs: log p(x | c), shape (max(C, 1), V^D); one row when unconditional.
        class_log_probs: log p(c), shape (max(C, 1),).
        vocab_size: V.
        seq_len: D.
        num_classes: C, 0 for an unconditional distribution. Label C is the null class,
            whose distribution is the marginal sum_c p(c) p(x | c).

    Toys of the same V, D and C have the same tree structure, so a function jitted for
    one is reused for another.
    """

    log_probs: Float[Array, "rows sequences"]
    class_log_probs: Float[Array, " rows"]
    vocab_size: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __check_init__(self):
        count = self.vocab_size**self.seq_len
        rows = max(self.num_classes, 1)
        if count > MAX_SEQUENCES:
            raise DdiffError(
                f"toy distribution: V^D = {count} sequences is more than "
                f"{MAX_SEQUENCES}; use a smaller vocabulary or length"
            )
        if self.log_probs.shape != (rows, count) or self.class_log_probs.shape != (rows,):
            raise DdiffError(
                f"toy distribution: log_probs must have shape {(rows, count)} "
                f"and class_log_probs {(rows,)}, got {self.log_probs.shape} and "
                f"{self.class_log_probs.shape}"
            )
        totals = np.exp(np.asarray(jax.nn.logsumexp(self.log_probs, axis=-1)))
        if not np.allclose(totals, 1.0, atol=1e-4):
            raise DdiffError(f"toy distribution: rows sum to {totals}, not 1")

    @property
    def num_sequences(self) -> int:
        return self.vocab_size**self.seq_len

    def sequences(self) -> Int[Array, "sequences seq"]:
        """Every sequence, in enumeration order."""
        return jnp.asarray(noisy_states(self.vocab_size, self.seq_len), jnp.int32)

    def index(self, x: Tokens) -> Int[Array, ""]:
        """The enumeration index of a sequence."""
        powers = self.vocab_size ** jnp.arange(self.seq_len - 1, -1, -1)
        return jnp.sum(x * powers).astype(jnp.int32)

    def sequence_log_probs(self, label: Label | None = None) -> Float[Array, " sequences"]:
        """log p(x | label) for every sequence; None or the null class gives the marginal."""
        marginal = jax.nn.logsumexp(self.class_log_probs[:, None] + self.log_probs, axis=0)
        if label is None or self.num_classes == 0:
            return marginal
        row = self.log_probs[jnp.clip(label, 0, self.num_classes - 1)]
        return jnp.where(label == self.num_classes, marginal, row)

    def log_prob(self, x: Tokens, label: Label | None = None) -> Scalar:
        """Exact log p(x | label) in nats."""
        return self.sequence_log_probs(label)[self.index(x)]

    def probabilities(self, label: int | None = None) -> np.ndarray:
        """p(x | label) for every sequence, as float64 numpy."""
        log_probs = np.asarray(self.sequence_log_probs(label), np.float64)
        probs = np.exp(log_probs)
        return probs / probs.sum()

    def entropy(self, label: int | None = None) -> float:
        """H(p) in nats (of p(. | label) when a label is given)."""
        probs = self.probabilities(label)
        nonzero = probs[probs > 0]
        return float(-(nonzero * np.log(nonzero)).sum())

    def conditional_entropy(self) -> float:
        """H(X | C) in nats (H(X) for an unconditional distribution)."""
        if self.num_classes == 0:
            return self.entropy()
        weights = np.exp(np.asarray(self.class_log_probs, np.float64))
        return float(sum(w * self.entropy(c) for c, w in enumerate(weights)))

    def sample(self, key: Key, num: int) -> tuple[Int[Array, "num seq"], Int[Array, " num"] | None]:
        """Draw ``num`` sequences, with their labels for a class-conditional distribution."""
        return _sample(self, key, num)


@eqx.filter_jit
def _sample(distribution: ToyDistribution, key: Key, num: int):
    label_key, sequence_key = jax.random.split(key)
    sequences = distribution.sequences()
    if distribution.num_classes == 0:
        logits = jnp.broadcast_to(distribution.log_probs[0], (num, distribution.num_sequences))
        return sequences[categorical(sequence_key, logits)], None
    labels = categorical(
        label_key, jnp.broadcast_to(distribution.class_log_probs, (num, distribution.num_classes))
    )
    return sequences[categorical(sequence_key, distribution.log_probs[labels])], labels


def _from_probs(probs: np.ndarray, vocab_size: int, seq_len: int) -> ToyDistribution:
    probs = np.asarray(probs, np.float64).reshape(1, -1)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)
    return ToyDistribution(
        log_probs=jnp.asarray(log_probs, jnp.float32),
        class_log_probs=jnp.zeros((1,), jnp.float32),
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_classes=0,
    )


def independent_toy(vocab_size: int = 3, seq_len: int = 4, *, seed: int = 0) -> ToyDistribution:
    """Independent positions, each with its own random marginal (Dirichlet(1)). Every
    factorized model is exact here: the discrete-time bound is tight for every T."""
    rng = np.random.default_rng([seed, 1])
    marginals = rng.dirichlet(np.ones(vocab_size), seq_len)
    sequences = noisy_states(vocab_size, seq_len)
    probs = np.prod(marginals[np.arange(seq_len), sequences], axis=-1)
    return _from_probs(probs, vocab_size, seq_len)


def _markov_probs(vocab_size: int, seq_len: int, rng: np.random.Generator, concentration: float):
    initial = rng.dirichlet(np.ones(vocab_size))
    transition = rng.dirichlet(np.full(vocab_size, concentration), vocab_size)
    sequences = noisy_states(vocab_size, seq_len)
    probs = initial[sequences[:, 0]]
    for position in range(1, seq_len):
        probs = probs * transition[sequences[:, position - 1], sequences[:, position]]
    return probs


def markov_toy(
    vocab_size: int = 3, seq_len: int = 4, *, seed: int = 0, concentration: float = 0.5
) -> ToyDistribution:
    """A first-order Markov chain with random initial distribution and transition rows
    (Dirichlet(concentration)): local dependence, full support."""
    rng = np.random.default_rng([seed, 2])
    probs = _markov_probs(vocab_size, seq_len, rng, concentration)
    return _from_probs(probs, vocab_size, seq_len)


def parity_toy(vocab_size: int = 3, seq_len: int = 4) -> ToyDistribution:
    """Uniform over the sequences whose digits sum to 0 mod V: any D-1 positions are
    independent and uniform, the last is determined. Most sequences have probability 0,
    and a model that unmasks two positions at once from their marginals is maximally
    wrong, so the discrete-time bound's gap is large at small T."""
    sequences = noisy_states(vocab_size, seq_len)
    probs = (sequences.sum(axis=-1) % vocab_size == 0).astype(np.float64)
    return _from_probs(probs, vocab_size, seq_len)


def dense_toy(
    vocab_size: int = 3, seq_len: int = 4, *, seed: int = 0, concentration: float = 1.0
) -> ToyDistribution:
    """Probabilities drawn from Dirichlet(concentration) over all V^D sequences: no
    structure to exploit, dependence of every order."""
    rng = np.random.default_rng([seed, 3])
    probs = rng.dirichlet(np.full(vocab_size**seq_len, concentration))
    return _from_probs(probs, vocab_size, seq_len)


def class_conditional_toy(
    vocab_size: int = 3, seq_len: int = 4, num_classes: int = 2, *, seed: int = 0
) -> ToyDistribution:
    """One Markov chain per class (Dirichlet(0.5) rows), classes drawn from a random
    distribution (Dirichlet(5)); label ``num_classes`` is the null class (the marginal)."""
    rng = np.random.default_rng([seed, 4])
    rows = np.stack([_markov_probs(vocab_size, seq_len, rng, 0.5) for _ in range(num_classes)])
    rows = rows / rows.sum(axis=-1, keepdims=True)
    class_probs = rng.dirichlet(np.full(num_classes, 5.0))
    with np.errstate(divide="ignore"):
        log_rows = np.log(rows)
    return ToyDistribution(
        log_probs=jnp.asarray(log_rows, jnp.float32),
        class_log_probs=jnp.asarray(np.log(class_probs), jnp.float32),
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_classes=num_classes,
    )


def toy_distributions(
    vocab_size: int = 3, seq_len: int = 4, *, seed: int = 0
) -> dict[str, ToyDistribution]:
    """The standard unconditional toys, by name: ``independent``, ``markov``, ``parity``,
    ``dense`` (see their constructors for their structure)."""
    return {
        "independent": independent_toy(vocab_size, seq_len, seed=seed),
        "markov": markov_toy(vocab_size, seq_len, seed=seed),
        "parity": parity_toy(vocab_size, seq_len),
        "dense": dense_toy(vocab_size, seq_len, seed=seed),
    }


def total_correlation(distribution: ToyDistribution) -> float:
    """sum_n H(x^n) - H(x) in nats: what a one-step (fully factorized) model loses."""
    probs = distribution.probabilities()
    sequences = noisy_states(distribution.vocab_size, distribution.seq_len)
    marginal_entropy = 0.0
    for position in range(distribution.seq_len):
        marginal = np.bincount(sequences[:, position], probs, distribution.vocab_size)
        nonzero = marginal[marginal > 0]
        marginal_entropy -= float((nonzero * np.log(nonzero)).sum())
    return marginal_entropy - distribution.entropy()
