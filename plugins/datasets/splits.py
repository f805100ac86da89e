"""Splits of token files and image arrays, and the checks the file-based sources share."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import ddiff


def check_index(index: int, count: int) -> int:
    """``index`` as an int, refused with IndexError outside 0..count-1."""
    index = int(index)
    if not 0 <= index < count:
        raise IndexError(f"example {index} of a split of {count}")
    return index


class TokenWindows:
    """A split of fixed-length windows into a 1-D token array (an ``np.memmap`` or an
    in-memory array): window i holds tokens [i*stride, i*stride + length). Every window is
    checked against the vocabulary as it is read, and a bad id is reported with the file
    and its position."""

    def __init__(
        self, tokens: np.ndarray, *, length: int, stride: int, vocab_size: int, where: str,
        offset: int = 0
    ):
        self.tokens = tokens
        self.length = length
        self.stride = stride
        self.vocab_size = vocab_size
        self.where = where
        self.offset = offset
        self.count = 0 if len(tokens) < length else (len(tokens) - length) // stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = check_index(index, self.count) * self.stride
        window = np.asarray(self.tokens[start : start + self.length])
        if window.max(initial=0) >= self.vocab_size:
            bad = int(np.argmax(window >= self.vocab_size))
            raise ddiff.DataError(
                f"{self.where}: token id {int(window[bad])} at position "
                f"{self.offset + start + bad} is outside the vocabulary 0..{self.vocab_size - 1}"
            )
        return {"tokens": window.astype(np.int32)}


class ImageRows:
    """A split of images stored one per row in channel-planar order (C, H, W), as in the
    CIFAR-10 batches and the downsampled ImageNet files, possibly across several arrays
    (memory-mapped or not). Examples are flattened in (H, W, C) order."""

    def __init__(
        self, parts: Sequence[np.ndarray], labels: np.ndarray | None, shape: tuple[int, int, int]
    ):
        self.parts = list(parts)
        self.labels = labels
        self.shape = shape
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = check_index(index, len(self))
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        height, width, channels = self.shape
        row = np.asarray(self.parts[part][index - self.starts[part]])
        tokens = row.reshape(channels, height, width).transpose(1, 2, 0).reshape(-1)
        item = {"tokens": tokens.astype(np.int32)}
        if self.labels is not None:
            item["label"] = np.int32(self.labels[index])
        return item


def nonempty(split: Any, what: str, why: str) -> Any:
    """``split``, refused with one line saying ``why`` when it holds no example."""
    if len(split) == 0:
        raise ddiff.DataError(f"{what}: the split is empty: {why}")
    return split


def check_held_out_keys(stride: int | None, eval_fraction: float) -> None:
    """Refuse the recipe keys of a source that holds out the tail of one file: ``stride``
    (null, or at least 1) and ``eval_fraction`` (in the open interval (0, 1))."""
    if stride is not None:
        ddiff.check_at_least("stride", stride)
    if not 0.0 < eval_fraction < 1.0:
        raise ddiff.RecipeError(
            f"eval_fraction must be in (0, 1), got {eval_fraction}", path="eval_fraction"
        )


def tail_split(
    tokens: np.ndarray, name: str, *, cut: int, length: int, stride: int, vocab_size: int,
    where: str
) -> TokenWindows:
    """Train on windows of ``tokens[:cut]`` starting every ``stride``; evaluate on
    disjoint windows of ``tokens[cut:]``."""
    if name == "train":
        part, offset, step = tokens[:cut], 0, stride
    else:
        part, offset, step = tokens[cut:], cut, length
    windows = TokenWindows(
        part, length=length, stride=step, vocab_size=vocab_size, where=where, offset=offset
    )
    return nonempty(
        windows, where, f"its {name} part has {len(part)} tokens, fewer than length={length}"
    )


def held_out_tail(
    tokens: np.ndarray, name: str, *, eval_fraction: float, length: int, stride: int | None,
    vocab_size: int, where: str
) -> TokenWindows:
    """:func:`tail_split` holding out the last ``eval_fraction`` of ``tokens`` (rounded to
    a whole token), training windows every ``stride`` (null: ``length``, disjoint)."""
    cut = len(tokens) - int(round(len(tokens) * eval_fraction))
    return tail_split(
        tokens,
        name,
        cut=cut,
        length=length,
        stride=stride or length,
        vocab_size=vocab_size,
        where=where,
    )


def token_memmap(path: Path, dtype: str, what: str) -> np.ndarray:
    """A token file memory-mapped: ``.npy`` (its header gives the dtype) or raw binary of
    ``dtype`` (uint16 or uint32)."""
    if not path.is_file():
        raise ddiff.DataError(f"{what}: {path} is missing")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ddiff.DataError(f"{what}: {path} is not a .npy array file ({error})") from None
        if tokens.dtype not in (np.uint16, np.uint32) or tokens.ndim != 1:
            raise ddiff.DataError(
                f"{what}: {path} holds a {tokens.dtype} array of shape {tokens.shape}; "
                f"expected a 1-D uint16 or uint32 array of token ids"
            )
        return tokens
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ddiff.DataError(
            f"{what}: {path} has {size} bytes, not a whole number of {dtype} tokens; "
            f"check the file and data.dtype"
        )
    if size == 0:
        raise ddiff.DataError(f"{what}: {path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")
