"""Built-in synthetic data whose exact entropy is known: a random Markov chain, and the
enumerable toy distributions of :mod:`ddiff.testing` (optionally class-conditional)."""

import dataclasses
import functools
import math
from typing import Literal

import jax
import numpy as np

import ddiff
import ddiff.testing


def _entropy_bits(probs: np.ndarray) -> np.ndarray:
    safe = np.where(probs > 0, probs, 1.0)
    return -np.sum(probs * np.log2(safe), axis=-1)


@dataclasses.dataclass(frozen=True)
class MarkovChainSource(ddiff.AbstractDataSource):
    """Sequences from a stationary Markov chain with a random sparse transition matrix.

    Rows of the transition matrix P are drawn from Dirichlet(concentration); the first
    token is drawn from the stationary distribution pi. The exact entropy per token is
    (H(pi) + (D-1) sum_i pi_i H(P_i)) / D bits; the unigram marginal of every position
    is pi, with entropy H(pi). A model must learn the chain's structure to approach the
    former. Construction refuses chains whose entropy is not at least 25% below H(pi).

    Attributes:
        num_symbols: vocabulary size V.
        length: positions per sequence D.
        concentration: Dirichlet concentration of each row (smaller is more structured).
        num_train: number of training sequences.
        num_eval: number of held-out sequences.
        seed: seed of the chain and of the sequences.
    """

    num_symbols: int = 16
    length: int = 32
    concentration: float = 0.15
    num_train: int = 20000
    num_eval: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_symbols < 2 or self.length < 1:
            raise ddiff.DataError("markov: num_symbols must be >= 2 and length >= 1")
        if self.num_train < 1 or self.num_eval < 1:
            raise ddiff.DataError("markov: num_train and num_eval must be >= 1")
        stats = self.reference_stats()
        if stats["entropy_bits_per_token"] > 0.75 * stats["unigram_bits_per_token"]:
            raise ddiff.DataError(
                f"markov: with concentration={self.concentration} the chain's entropy "
                f"({stats['entropy_bits_per_token']:.3f} bits/token) is not 25% below its "
                f"unigram entropy ({stats['unigram_bits_per_token']:.3f}); lower concentration"
            )

    @property
    def vocab_size(self) -> int:
        return self.num_symbols

    @property
    def seq_len(self) -> int:
        return self.length

    @functools.cached_property
    def chain(self) -> tuple[np.ndarray, np.ndarray]:
        """(transition matrix P, stationary distribution pi)."""
        rng = np.random.default_rng([self.seed, 0])
        transition = rng.dirichlet(np.full(self.num_symbols, self.concentration), self.num_symbols)
        transition = np.maximum(transition, 1e-12)
        transition /= transition.sum(axis=1, keepdims=True)
        eigenvalues, eigenvectors = np.linalg.eig(transition.T)
        stationary = np.real(eigenvectors[:, np.argmin(np.abs(eigenvalues - 1.0))])
        stationary = np.abs(stationary) / np.abs(stationary).sum()
        return transition, stationary

    def reference_stats(self) -> dict[str, float]:
        transition, stationary = self.chain
        unigram = float(_entropy_bits(stationary))
        rate = float(np.sum(stationary * _entropy_bits(transition)))
        entropy = (unigram + (self.length - 1) * rate) / self.length
        return {"entropy_bits_per_token": entropy, "unigram_bits_per_token": unigram}

    def log_prob(self, tokens: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Exact log p(x) in nats of sequences of shape (..., D) (the chain has no labels)."""
        del labels
        transition, stationary = self.chain
        tokens = np.asarray(tokens)
        logp = np.log(stationary[tokens[..., 0]])
        logp = logp + np.log(transition[tokens[..., :-1], tokens[..., 1:]]).sum(-1)
        return logp

    def _generate(self, count: int, stream: int) -> np.ndarray:
        transition, stationary = self.chain
        rng = np.random.default_rng([self.seed, stream])
        cumulative = np.cumsum(transition, axis=1)
        tokens = np.empty((count, self.length), np.int32)
        tokens[:, 0] = rng.choice(self.num_symbols, size=count, p=stationary)
        uniforms = rng.random((count, self.length))
        for position in range(1, self.length):
            rows = cumulative[tokens[:, position - 1]]
            drawn = (uniforms[:, position, None] > rows).sum(axis=1)
            tokens[:, position] = np.minimum(drawn, self.num_symbols - 1)
        return tokens

    @functools.cached_property
    def _splits(self) -> dict[str, ddiff.ArraySplit]:
        return {
            "train": ddiff.ArraySplit(self._generate(self.num_train, 1)),
            "eval": ddiff.ArraySplit(self._generate(self.num_eval, 2)),
        }

    def split(self, name: str) -> ddiff.ArraySplit:
        return self._splits[name]


@dataclasses.dataclass(frozen=True)
class ToySource(ddiff.AbstractDataSource):
    """Sequences drawn from one of the enumerable toy distributions of
    :mod:`ddiff.testing` (V^D sequences with exact probabilities); ``classes`` is
    class-conditional, with labels. ``reference_stats`` gives the exact entropy
    (H(X | C) for labelled data) per token, which a perfect model's bits per token reach.

    Attributes:
        toy: ``independent``, ``markov``, ``parity``, ``dense`` or ``classes``.
        num_symbols: vocabulary size V.
        length: positions per sequence D (V^D at most 4096).
        classes: number of classes of the ``classes`` toy (ignored by the others).
        num_train: number of training sequences.
        num_eval: number of held-out sequences.
        seed: seed of the distribution and of the sequences.
    """

    toy: Literal["independent", "markov", "parity", "dense", "classes"] = "markov"
    num_symbols: int = 3
    length: int = 4
    classes: int = 2
    num_train: int = 4096
    num_eval: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_symbols < 2 or self.length < 1:
            raise ddiff.DataError("toy: num_symbols must be >= 2 and length >= 1")
        if self.num_symbols**self.length > ddiff.testing.MAX_SEQUENCES:
            raise ddiff.DataError(
                f"toy: V^D = {self.num_symbols**self.length} sequences is more than "
                f"{ddiff.testing.MAX_SEQUENCES}; lower num_symbols or length"
            )
        if self.num_train < 1 or self.num_eval < 1:
            raise ddiff.DataError("toy: num_train and num_eval must be >= 1")
        if self.toy == "classes" and self.classes < 1:
            raise ddiff.DataError("toy: classes must be >= 1")

    @property
    def vocab_size(self) -> int:
        return self.num_symbols

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def num_classes(self) -> int:
        return self.classes if self.toy == "classes" else 0

    @functools.cached_property
    def distribution(self) -> ddiff.testing.ToyDistribution:
        """The exact distribution the sequences are drawn from."""
        if self.toy == "classes":
            return ddiff.testing.class_conditional_toy(
                self.num_symbols, self.length, self.classes, seed=self.seed
            )
        return ddiff.testing.toy_distributions(self.num_symbols, self.length, seed=self.seed)[
            self.toy
        ]

    def reference_stats(self) -> dict[str, float]:
        bits = self.distribution.conditional_entropy() / (self.length * math.log(2.0))
        return {"entropy_bits_per_token": bits}

    def log_prob(self, tokens: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Exact log p(x | label) in nats of sequences of shape (N, D) (the marginal over
        classes without labels); -inf for a sequence of probability 0."""
        tokens = np.asarray(tokens, np.int64)
        index = tokens @ (self.num_symbols ** np.arange(self.length - 1, -1, -1))
        if labels is None or self.num_classes == 0:
            table = np.asarray(self.distribution.sequence_log_probs(None), np.float64)
            return table[index]
        tables = np.stack(
            [np.asarray(self.distribution.sequence_log_probs(c), np.float64) for c in range(self.num_classes)]
        )
        return tables[np.asarray(labels), index]

    @functools.cached_property
    def _splits(self) -> dict[str, ddiff.ArraySplit]:
        splits = {}
        for stream, name in enumerate(("train", "eval"), start=1):
            count = self.num_train if name == "train" else self.num_eval
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), stream)
            tokens, labels = self.distribution.sample(key, count)
            splits[name] = ddiff.ArraySplit(
                np.asarray(tokens), None if labels is None else np.asarray(labels)
            )
        return splits

    def split(self, name: str) -> ddiff.ArraySplit:
        return self._splits[name]


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("data", "markov", MarkovChainSource)
    registry.register("data", "toy", ToySource)
