"""A file of token ids, memory-mapped."""

import dataclasses
import functools
from pathlib import Path
from typing import Literal

import numpy as np

import ddiff
from ddiff_plugins.datasets.splits import (
    TokenWindows,
    check_fraction,
    tail_cut,
    tail_split,
    token_memmap,
)


@dataclasses.dataclass(frozen=True)
class TokenFileSource(ddiff.AbstractDataSource):
    """A file of token ids, memory-mapped: raw binary uint16/uint32 (``.bin``) or a 1-D
    ``.npy`` array. Training uses windows of ``length`` starting every ``stride`` tokens
    of the first 1 - ``eval_fraction`` of the file; evaluation uses disjoint windows of the
    rest.

    Attributes (recipe keys):
        path: the token file.
        vocabulary: number of token values V (every id must be below it).
        length: tokens per example.
        dtype: ``uint16`` or ``uint32``, for raw files (``.npy`` files carry their own).
        stride: tokens between training windows (null: ``length``, disjoint).
        eval_fraction: the held-out tail of the file.
        unit: what evaluation reports beside bits per token.
    """

    path: str
    vocabulary: int
    length: int = 1024
    dtype: Literal["uint16", "uint32"] = "uint16"
    stride: int | None = None
    eval_fraction: float = 0.02
    unit: Literal["bits_per_token", "bits_per_char", "perplexity"] = "bits_per_token"

    def __post_init__(self) -> None:
        ddiff.check_at_least("vocabulary", self.vocabulary)
        ddiff.check_at_least("length", self.length)
        if self.stride is not None:
            ddiff.check_at_least("stride", self.stride)
        check_fraction(self.eval_fraction, "eval_fraction")

    @property
    def vocab_size(self) -> int:
        return self.vocabulary

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def metric(self) -> str:
        return self.unit

    @functools.cached_property
    def _tokens(self) -> np.ndarray:
        return token_memmap(Path(self.path).expanduser().absolute(), self.dtype, "token_file")

    def split(self, name: str) -> TokenWindows:
        return tail_split(
            self._tokens,
            name,
            cut=tail_cut(len(self._tokens), self.eval_fraction),
            length=self.length,
            stride=self.stride or self.length,
            vocab_size=self.vocabulary,
            where=f"token_file {Path(self.path).expanduser().absolute()}",
        )
