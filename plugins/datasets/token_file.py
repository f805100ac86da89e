"""A file of token ids, memory-mapped."""

import os
import stat
from pathlib import Path
from typing import Literal

import equinox as eqx
import numpy as np

import ddiff
from ddiff_plugins.datasets.splits import (
    TokenWindows,
    check_held_out_keys,
    held_out_tail,
    token_memmap,
)
from ddiff_plugins.datasets.windows import AbstractWindowSource


class TokenFileSource(AbstractWindowSource):
    """A file of token ids, memory-mapped: raw binary uint16/uint32 (``.bin``) or a 1-D
    ``.npy`` array. Training uses windows of ``length`` starting every ``stride`` tokens
    of the first 1 - ``eval_fraction`` of the file; evaluation uses disjoint windows of the
    rest. The file is mapped when a split is first asked for, and the map kept outside
    the module (:func:`ddiff.cached_load`).

    Attributes (recipe keys):
        path: the token file.
        vocabulary: number of token values V (every id must be below it).
        length: tokens per example.
        dtype: ``uint16`` or ``uint32``, for raw files (``.npy`` files carry their own).
        stride: tokens between training windows (null: ``length``, disjoint).
        eval_fraction: the held-out tail of the file.
        unit: what evaluation reports beside bits per token.
    """

    path: str = eqx.field(static=True)
    vocabulary: int = eqx.field(static=True)
    length: int = eqx.field(static=True, default=1024)
    dtype: Literal["uint16", "uint32"] = eqx.field(static=True, default="uint16")
    stride: int | None = eqx.field(static=True, default=None)
    eval_fraction: float = eqx.field(static=True, default=0.02)
    unit: Literal["bits_per_token", "bits_per_char", "perplexity"] = eqx.field(
        static=True, default="bits_per_token"
    )

    def __check_init__(self) -> None:
        ddiff.check_at_least("vocabulary", self.vocabulary)
        check_held_out_keys(self.stride, self.eval_fraction)

    @property
    def vocab_size(self) -> int:
        return self.vocabulary

    @property
    def metric(self) -> str:
        return self.unit

    @ddiff.cached_load
    def _tokens(self) -> np.ndarray:
        path = Path(self.path).expanduser().absolute()
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
            raise ddiff.DataError(f"token_file: {path} is {kind}; give data.path a token file")
        return token_memmap(path, self.dtype, "token_file")

    def split(self, name: str) -> TokenWindows:
        return held_out_tail(
            self._tokens,
            name,
            eval_fraction=self.eval_fraction,
            length=self.length,
            stride=self.stride,
            vocab_size=self.vocabulary,
            where=f"token_file {Path(self.path).expanduser().absolute()}",
        )
