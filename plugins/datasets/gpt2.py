"""GPT-2 tokenisation (tiktoken's ``gpt2`` byte-pair encoding) for the text sources."""

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

import ddiff
from ddiff_plugins.datasets.optional import optional_import
from ddiff_plugins.datasets.windows import AbstractWindowSource

VOCAB_SIZE = 50257
"""GPT-2's vocabulary size."""
EOS = 50256
"""GPT-2's end-of-text id, which separates documents."""


@functools.cache
def encoding() -> Any:
    """The GPT-2 byte-pair encoding (tiktoken's ``gpt2``)."""
    tiktoken = optional_import("tiktoken", "text", "GPT-2 tokenization")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # noqa: BLE001 - tiktoken fetches its tables; any failure is the user's setup
        raise ddiff.DataError(
            f"cannot load tiktoken's GPT-2 tables ({error}); run once with network access "
            f"or point TIKTOKEN_CACHE_DIR at a cache that has them"
        ) from None


def decode(tokens: np.ndarray) -> str:
    """GPT-2 ids as text (ids beyond the vocabulary, such as a mask, are left out); the
    ids themselves when tiktoken is unavailable."""
    try:
        tables = encoding()
    except ddiff.DdiffError:
        return " ".join(str(int(t)) for t in tokens)
    return tables.decode([int(t) for t in tokens if t < VOCAB_SIZE])


def documents(batches: Iterable[Sequence[str]]) -> Iterator[np.ndarray]:
    """Each document of each batch as uint16 GPT-2 ids followed by end-of-text."""
    tables = encoding()
    for batch in batches:
        for ids in tables.encode_ordinary_batch(list(batch)):
            yield np.asarray([*ids, EOS], np.uint16)


class AbstractGPT2Source(AbstractWindowSource):
    """Text as GPT-2 token ids in sequences of ``length``, scored in perplexity, decoded
    back to text for samples."""

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def metric(self) -> str:
        return "perplexity"

    def decode(self, tokens: np.ndarray) -> str:
        return decode(tokens)
