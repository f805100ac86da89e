"""A UTF-8 text file modelled character by character."""

import dataclasses
import functools
from pathlib import Path

import numpy as np

import ddiff
from ddiff_plugins.datasets.splits import TokenWindows, check_fraction, tail_cut, tail_split


@dataclasses.dataclass(frozen=True)
class TextFileSource(ddiff.AbstractDataSource):
    """A UTF-8 text file modelled character by character. The vocabulary is ``alphabet``
    (token i is its i-th character) or, when null, the file's distinct characters in
    code-point order. The last ``eval_fraction`` of the characters is held out; training
    windows of ``length`` start every ``stride`` characters of the rest.

    The file is read into memory once (4 bytes a character while encoding); for corpora
    of billions of characters, write a :class:`TokenFileSource` file instead.

    Attributes (recipe keys):
        path: the text file.
        length: characters per example.
        alphabet: the characters, in token order (null: from the file).
        stride: characters between training windows (null: ``length``, disjoint).
        eval_fraction: the held-out tail of the file.
    """

    path: str
    length: int = 256
    alphabet: str | None = None
    stride: int | None = None
    eval_fraction: float = 0.05

    def __post_init__(self) -> None:
        ddiff.check_at_least("length", self.length)
        if self.stride is not None:
            ddiff.check_at_least("stride", self.stride)
        check_fraction(self.eval_fraction, "eval_fraction")
        if self.alphabet is not None and len(set(self.alphabet)) != len(self.alphabet):
            raise ddiff.RecipeError("alphabet repeats a character", path="alphabet")

    @functools.cached_property
    def _encoded(self) -> tuple[np.ndarray, str]:
        """(the text as token ids, the alphabet)."""
        path = Path(self.path).expanduser().absolute()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ddiff.DataError(f"text_file: {path} is missing") from None
        except IsADirectoryError:
            raise ddiff.DataError(f"text_file: {path} is a directory; give data.path a text file") from None
        except OSError as error:
            raise ddiff.DataError(f"text_file: cannot read {path}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise ddiff.DataError(
                f"text_file: {path} is not UTF-8 text (byte {error.start} cannot be decoded)"
            ) from None
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        alphabet = self.alphabet
        if alphabet is None:
            alphabet = "".join(chr(c) for c in np.unique(points))
        if not alphabet:
            raise ddiff.DataError(f"text_file: {path} is empty")
        known = np.array(sorted(ord(c) for c in alphabet), dtype=np.uint32)
        order = np.argsort([ord(c) for c in alphabet]).astype(np.int64)
        position = np.clip(np.searchsorted(known, points), 0, len(known) - 1)
        unknown = known[position] != points
        if np.any(unknown):
            bad = int(np.argmax(unknown))
            raise ddiff.DataError(
                f"text_file: {path} has character {chr(points[bad])!r} at offset {bad}, "
                f"which is not in data.alphabet"
            )
        dtype = np.uint8 if len(alphabet) <= 256 else np.uint32
        return order[position].astype(dtype), alphabet

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) if self.alphabet is not None else len(self._encoded[1])

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def metric(self) -> str:
        return "bits_per_char"

    def decode(self, tokens: np.ndarray) -> str:
        alphabet = self._encoded[1] if self.alphabet is None else self.alphabet
        return "".join(alphabet[int(t)] if t < len(alphabet) else "_" for t in tokens)

    def split(self, name: str) -> TokenWindows:
        return tail_split(
            self._encoded[0],
            name,
            cut=tail_cut(len(self._encoded[0]), self.eval_fraction),
            length=self.length,
            stride=self.stride or self.length,
            vocab_size=self.vocab_size,
            where=f"text_file {Path(self.path).expanduser().absolute()}",
        )
