"""A UTF-8 text file modelled character by character."""

import os
import stat
from pathlib import Path

import equinox as eqx
import numpy as np

import ddiff
from ddiff_plugins.datasets.splits import TokenWindows, check_held_out_keys, held_out_tail
from ddiff_plugins.datasets.windows import AbstractCharacterSource

MAX_TEXT_BYTES = 2**30
"""The largest text file read into memory (1 GiB, 4 GiB once encoded); larger corpora
are written as a ``token_file``."""


def _check_regular_file(path: Path) -> None:
    """Refuse a path that is not a regular file (a device such as /dev/zero, a FIFO) or is
    larger than :data:`MAX_TEXT_BYTES`, before anything is read."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise ddiff.DataError(f"text_file: {path} is missing") from None
    except OSError as error:
        raise ddiff.DataError(f"text_file: cannot read {path}: {error.strerror}") from None
    if stat.S_ISDIR(status.st_mode):
        raise ddiff.DataError(f"text_file: {path} is a directory; give data.path a text file")
    if not stat.S_ISREG(status.st_mode):
        raise ddiff.DataError(
            f"text_file: {path} is not a regular file (a device, FIFO or socket); give data.path a text file"
        )
    if status.st_size > MAX_TEXT_BYTES:
        raise ddiff.DataError(
            f"text_file: {path} has {status.st_size / 2**30:.1f} GiB, more than the "
            f"{MAX_TEXT_BYTES // 2**30} GiB read into memory; write its tokens as a token_file"
        )


class TextFileSource(AbstractCharacterSource):
    """A UTF-8 text file modelled character by character. The vocabulary is ``alphabet``
    (token i is its i-th character) or, when null, the file's distinct characters in
    code-point order. The last ``eval_fraction`` of the characters is held out; training
    windows of ``length`` start every ``stride`` characters of the rest.

    The file is read into memory once, when a split (or, with no ``alphabet``, the
    vocabulary) is first asked for, and its tokens kept outside the module
    (:func:`ddiff.cached_load`); encoding takes 4 bytes a character, so for corpora of
    billions of characters write a :class:`TokenFileSource` file instead.

    Attributes (recipe keys):
        path: the text file.
        length: characters per example.
        alphabet: the characters, in token order (null: from the file).
        stride: characters between training windows (null: ``length``, disjoint).
        eval_fraction: the held-out tail of the file.
    """

    path: str = eqx.field(static=True)
    length: int = eqx.field(static=True, default=256)
    alphabet: str | None = eqx.field(static=True, default=None)
    stride: int | None = eqx.field(static=True, default=None)
    eval_fraction: float = eqx.field(static=True, default=0.05)

    def __check_init__(self) -> None:
        check_held_out_keys(self.stride, self.eval_fraction)
        if self.alphabet is None:
            return
        if not self.alphabet:
            raise ddiff.RecipeError(
                "alphabet is empty; list the characters, or null to take them from the file",
                path="alphabet",
            )
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ddiff.RecipeError("alphabet repeats a character", path="alphabet")

    @ddiff.cached_load
    def _encoded(self) -> tuple[np.ndarray, str]:
        """(the text as token ids, the alphabet)."""
        path = Path(self.path).expanduser().absolute()
        _check_regular_file(path)
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
    def characters(self) -> str:
        return self._encoded[1] if self.alphabet is None else self.alphabet

    def split(self, name: str) -> TokenWindows:
        return held_out_tail(
            self._encoded[0],
            name,
            eval_fraction=self.eval_fraction,
            length=self.length,
            stride=self.stride,
            vocab_size=self.vocab_size,
            where=f"text_file {Path(self.path).expanduser().absolute()}",
        )
