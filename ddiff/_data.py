"""The data-source protocol: token sequences of fixed length in ``train`` and ``eval``
splits (the runner batches them, :mod:`ddiff.runner.pipeline`)."""

import abc
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import equinox as eqx
import numpy as np

from ddiff._capabilities import Capable

METRICS = ("bits_per_token", "bits_per_dim", "bits_per_char", "perplexity")
"""Units a data source may ask evaluation to report beside bits per token."""

_Loaded = TypeVar("_Loaded")

_LOADED: dict[int, dict[str, Any]] = {}
"""id(source) -> its loads by name, each entry dropped when its source is collected."""


class RandomAccess(Protocol):
    """A split: ``len()`` examples, each a dict with ``tokens`` (int32, shape (seq,)) and,
    for labelled data, ``label`` (int32 scalar)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, np.ndarray]: ...


def cached_load(load: Callable[[Any], _Loaded]) -> property:
    """A data source's property computed on first use and kept outside the module (a
    decorator, like ``functools.cached_property``): what a source loads (arrays, opened
    files, a generated chain) is never one of its fields, so never a pytree leaf that jit
    would trace or copy, and the source stays equal to, and hashed like, any other with
    the same recipe keys.

    The result is held in a table keyed by the source's identity and dropped when the
    source is garbage-collected; a copy of the source (made by a pytree transformation,
    for instance) loads again.
    """
    name = load.__qualname__

    @functools.wraps(load)
    def loaded(source: Any) -> _Loaded:
        key = id(source)
        table = _LOADED.get(key)
        if table is None:
            table = _LOADED[key] = {}
            weakref.finalize(source, _LOADED.pop, key, None)
        if name not in table:
            table[name] = load(source)
        return table[name]

    return property(loaded)


class AbstractDataSource(eqx.Module, Capable):
    """A data set of token sequences with fixed length, split into ``train`` and ``eval``.

    Like every component, a source is abstract (``Abstract*``) or final. A final source is
    an Equinox module whose fields are the recipe's keys, each a static field
    (``eqx.field(static=True)``: hyper-parameters, never arrays), so a source has no
    pytree leaves. Invariants of the keys are checked in ``__check_init__``, raising
    :class:`~ddiff.RecipeError` with ``path`` naming the key (the recipe builder puts the
    section's path in front: ``data.length``). :class:`~ddiff.DataError` is for what
    reading the data finds: a missing or corrupt file, a token outside the vocabulary.
    A source reads its files only when a split is first asked for; what it loads is kept
    out of the module with :func:`cached_load`.
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
        """The examples of split ``name`` (``train`` or ``eval``), random access.

        Arguments:
            name: ``train`` or ``eval``.

        Returns:
            The split, with ``len()`` and items ``{"tokens": int32 (D,)}`` (plus
            ``"label"`` for labelled data).

        Raises:
            DataError: the files are missing or malformed, or the split is empty.
        """

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
