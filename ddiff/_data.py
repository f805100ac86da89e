"""The data-source protocol: token sequences of fixed length in ``train`` and ``eval``
splits (the runner batches them, :mod:`ddiff.runner.pipeline`)."""

import abc
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from ddiff._capabilities import Capable

METRICS = ("bits_per_token", "bits_per_dim", "bits_per_char", "perplexity")
"""Units a data source may ask evaluation to report beside bits per token."""


class RandomAccess(Protocol):
    """A split: ``len()`` examples, each a dict with ``tokens`` (int32, shape (seq,)) and,
    for labelled data, ``label`` (int32 scalar)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, np.ndarray]: ...


class AbstractDataSource(abc.ABC, Capable):
    """A data set of token sequences with fixed length, split into ``train`` and ``eval``.

    Final implementations are frozen dataclasses whose fields are the recipe's keys.
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token values V."""

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """Positions per example D."""

    @property
    def num_classes(self) -> int:
        """Number of class labels (0 for unlabelled data)."""
        return 0

    @abc.abstractmethod
    def split(self, name: str) -> RandomAccess:
        """The examples of split ``name`` (``train`` or ``eval``), random access."""

    def reference_stats(self) -> dict[str, float]:
        """Exact reference numbers for evaluation (e.g. ``entropy_bits_per_token``)."""
        return {}

    def log_prob(self, tokens: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray | None:
        """Exact log p(x) in nats of every sequence of ``tokens`` (shape (N, D)), given its
        label where ``labels`` (shape (N,)) is given, for a source that knows its
        distribution (the synthetic ones); None for a source that does not. It scores
        samples exactly (their log-likelihood under the true source, beside its
        entropy)."""
        return None

    def decode(self, tokens: np.ndarray) -> str:
        """Human-readable rendering of one sequence."""
        return " ".join(str(int(token)) for token in tokens)

    @property
    def metric(self) -> str:
        """The unit evaluation reports beside bits per token (one of :data:`METRICS`):
        ``bits_per_dim`` for images, ``bits_per_char`` for character-level text,
        ``perplexity`` for word-piece text."""
        return "bits_per_token"

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(height, width, channels) when every example is an image flattened in that
        order (samples are then also written as PNG grids); None otherwise."""
        return None


class ArraySplit:
    """A split held in memory: tokens of shape (N, D) and optional labels of shape (N,)."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray | None = None):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item = {"tokens": self.tokens[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item
