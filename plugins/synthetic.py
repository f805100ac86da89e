"""Built-in synthetic data whose exact entropy is known: a random Markov chain, independent
uniform tokens (any vocabulary, no table), and the enumerable toy distributions of
:mod:`ddiff.testing` (optionally class-conditional)."""

import abc
import math
from typing import Literal

import equinox as eqx
import jax
import numpy as np

import ddiff
import ddiff.testing


def _entropy_bits(probs: np.ndarray) -> np.ndarray:
    safe = np.where(probs > 0, probs, 1.0)
    return -np.sum(probs * np.log2(safe), axis=-1)


class AbstractSyntheticSource(ddiff.AbstractDataSource):
    """Sequences of ``length`` tokens of ``num_symbols`` values drawn from a distribution
    known exactly: ``num_train`` training and ``num_eval`` held-out sequences, the
    distribution and the draws all fixed by ``seed``. The draws are made when a split is
    first asked for and kept outside the module (:func:`ddiff.cached_load`)."""

    num_symbols: eqx.AbstractVar[int]
    length: eqx.AbstractVar[int]
    num_train: eqx.AbstractVar[int]
    num_eval: eqx.AbstractVar[int]
    seed: eqx.AbstractVar[int]

    @property
    def vocab_size(self) -> int:
        return self.num_symbols

    @property
    def seq_len(self) -> int:
        return self.length

    @abc.abstractmethod
    def draw(self, count: int, stream: int) -> ddiff.ArraySplit:
        """``count`` sequences (with their labels, for labelled data) from the random
        stream numbered ``stream`` of ``seed`` (1 for training, 2 for evaluation)."""

    @ddiff.cached_load
    def _splits(self) -> dict[str, ddiff.ArraySplit]:
        return {"train": self.draw(self.num_train, 1), "eval": self.draw(self.num_eval, 2)}

    def split(self, name: str) -> ddiff.ArraySplit:
        return self._splits[name]


DRAW_BYTES_PER_TOKEN = 12
"""A draw holds each token as an int32 beside the float64 uniform it is drawn from."""

CHAIN_BYTES_PER_ENTRY = 48
"""Building the chain holds about six V x V float64 tables: the Dirichlet draws, the
transition matrix, its cumulative sums and the linear system of the stationary
distribution with its factorisation."""


def _check_sizes(source: AbstractSyntheticSource) -> None:
    """Refuse sizes that make no data set, or draws that cannot fit in memory (the first
    check of every synthetic source, since its others read the distribution those sizes
    define)."""
    ddiff.check_at_least("num_symbols", source.num_symbols, 2)
    ddiff.check_at_least("length", source.length)
    ddiff.check_at_least("num_train", source.num_train)
    ddiff.check_at_least("num_eval", source.num_eval)
    count = max(source.num_train, source.num_eval)
    ddiff.check_table_fits(
        (count, source.length),
        DRAW_BYTES_PER_TOKEN,
        what=f"drawing {count} sequences of {source.length} tokens",
        path="length" if source.length >= count else ("num_train" if count == source.num_train else "num_eval"),
    )


class MarkovChainSource(AbstractSyntheticSource):
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

    num_symbols: int = eqx.field(static=True, default=16)
    length: int = eqx.field(static=True, default=32)
    concentration: float = eqx.field(static=True, default=0.15)
    num_train: int = eqx.field(static=True, default=20000)
    num_eval: int = eqx.field(static=True, default=2000)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self) -> None:
        _check_sizes(self)
        ddiff.check_table_fits(
            (self.num_symbols, self.num_symbols),
            CHAIN_BYTES_PER_ENTRY,
            what=f"the {self.num_symbols} x {self.num_symbols} transition matrix",
            path="num_symbols",
            change="lower num_symbols, or use data kind random_tokens (no table, any vocabulary)",
        )
        if not self.concentration > 0:
            raise ddiff.RecipeError(
                f"concentration must be positive, got {self.concentration}", path="concentration"
            )
        stats = self.reference_stats()
        if stats["entropy_bits_per_token"] > 0.75 * stats["unigram_bits_per_token"]:
            raise ddiff.RecipeError(
                f"with concentration={self.concentration} the chain's entropy "
                f"({stats['entropy_bits_per_token']:.3f} bits/token) is not 25% below its "
                f"unigram entropy ({stats['unigram_bits_per_token']:.3f}); lower concentration",
                path="concentration",
            )

    @ddiff.cached_load
    def chain(self) -> tuple[np.ndarray, np.ndarray]:
        """(transition matrix P, stationary distribution pi).

        pi solves pi (P - I) = 0 with sum(pi) = 1, one equation of the singular system
        replaced by the normalisation: one LU solve, (2/3) V^3 operations (every entry of
        P is positive, so the chain is irreducible and pi unique)."""
        rng = np.random.default_rng([self.seed, 0])
        transition = rng.dirichlet(np.full(self.num_symbols, self.concentration), self.num_symbols)
        transition = np.maximum(transition, 1e-12)
        transition /= transition.sum(axis=1, keepdims=True)
        system = transition.T - np.eye(self.num_symbols)
        system[-1] = 1.0
        target = np.zeros(self.num_symbols)
        target[-1] = 1.0
        stationary = np.abs(np.linalg.solve(system, target))
        return transition, stationary / stationary.sum()

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

    def draw(self, count: int, stream: int) -> ddiff.ArraySplit:
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
        return ddiff.ArraySplit(tokens)


class RandomTokenSource(AbstractSyntheticSource):
    """Sequences of independent tokens, each uniform over the V values: nothing to learn,
    and no table of any size, so it takes any vocabulary (GPT-2's 50,257 included). The
    exact entropy per token, and the unigram entropy, are log2 V bits; the benchmark's
    shapes use it, since only its sizes matter there.

    Attributes:
        num_symbols: vocabulary size V.
        length: positions per sequence D.
        num_train: number of training sequences.
        num_eval: number of held-out sequences.
        seed: seed of the sequences.
    """

    num_symbols: int = eqx.field(static=True, default=16)
    length: int = eqx.field(static=True, default=32)
    num_train: int = eqx.field(static=True, default=20000)
    num_eval: int = eqx.field(static=True, default=2000)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self) -> None:
        _check_sizes(self)

    def reference_stats(self) -> dict[str, float]:
        bits = math.log2(self.num_symbols)
        return {"entropy_bits_per_token": bits, "unigram_bits_per_token": bits}

    def log_prob(self, tokens: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Exact log p(x) = -D log V in nats of sequences of shape (..., D) (no labels)."""
        del labels
        tokens = np.asarray(tokens)
        return np.full(tokens.shape[:-1], -tokens.shape[-1] * math.log(self.num_symbols))

    def draw(self, count: int, stream: int) -> ddiff.ArraySplit:
        rng = np.random.default_rng([self.seed, stream])
        return ddiff.ArraySplit(rng.integers(0, self.num_symbols, (count, self.length), dtype=np.int32))


class ToySource(AbstractSyntheticSource):
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

    toy: Literal["independent", "markov", "parity", "dense", "classes"] = eqx.field(
        static=True, default="markov"
    )
    num_symbols: int = eqx.field(static=True, default=3)
    length: int = eqx.field(static=True, default=4)
    classes: int = eqx.field(static=True, default=2)
    num_train: int = eqx.field(static=True, default=4096)
    num_eval: int = eqx.field(static=True, default=1024)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self) -> None:
        _check_sizes(self)
        if self.num_symbols**self.length > ddiff.testing.MAX_SEQUENCES:
            raise ddiff.RecipeError(
                f"V^D = {self.num_symbols**self.length} sequences is more than "
                f"{ddiff.testing.MAX_SEQUENCES}; lower num_symbols or length",
                path="length",
            )
        if self.toy == "classes":
            ddiff.check_at_least("classes", self.classes)

    @property
    def num_classes(self) -> int:
        return self.classes if self.toy == "classes" else 0

    @ddiff.cached_load
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

    def draw(self, count: int, stream: int) -> ddiff.ArraySplit:
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), stream)
        tokens, labels = self.distribution.sample(key, count)
        return ddiff.ArraySplit(np.asarray(tokens), None if labels is None else np.asarray(labels))


COMPONENTS: dict[str, dict[str, type]] = {
    "data": {"markov": MarkovChainSource, "random_tokens": RandomTokenSource, "toy": ToySource},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
