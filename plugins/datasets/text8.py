"""text8: the first 10^8 characters of an English Wikipedia dump."""

import zipfile
from pathlib import Path
from typing import Literal

import equinox as eqx
import numpy as np

import ddiff
from ddiff_plugins.datasets.splits import TokenWindows, nonempty
from ddiff_plugins.datasets.windows import AbstractCharacterSource

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def _character_table(alphabet: str) -> np.ndarray:
    table = np.full(256, 255, np.uint8)
    for code, character in enumerate(alphabet):
        table[ord(character)] = code
    return table


class Text8Source(AbstractCharacterSource):
    """text8: the first 10^8 characters of an English Wikipedia dump, lower-case letters
    and spaces (27 symbols: ``a``..``z`` are 0..25, space is 26), split as in the paper
    into the first 90M characters (train), the next 5M (validation) and the last 5M (test).
    (Proportionally 90%/5%/5% for a file of another length.)

    Training examples are windows of ``length`` characters starting every
    ``train_stride`` characters (1, every offset, as in the MD4 code); evaluation uses
    disjoint chunks of ``length``. The text is read as symbol codes (100 MB) when a split
    is first asked for, and kept outside the module (:func:`ddiff.cached_load`).

    Attributes (recipe keys):
        root: directory holding ``text8.zip`` (or the extracted file ``text8``).
        length: characters per example (the paper: 256).
        train_stride: characters between the starts of consecutive training windows.
        eval_split: ``validation`` or ``test`` (the paper reports test BPC).
    """

    root: str = eqx.field(static=True, default="data/text8")
    length: int = eqx.field(static=True, default=256)
    train_stride: int = eqx.field(static=True, default=1)
    eval_split: Literal["validation", "test"] = eqx.field(static=True, default="validation")

    def __check_init__(self) -> None:
        ddiff.check_at_least("train_stride", self.train_stride)

    @property
    def characters(self) -> str:
        return TEXT8_ALPHABET

    @ddiff.cached_load
    def _codes(self) -> tuple[np.ndarray, str]:
        """(the text as symbol codes, uint8; the file it came from)."""
        root = Path(self.root).expanduser().absolute()
        plain, archive = root / "text8", root / "text8.zip"
        if plain.is_file():
            raw, where = np.memmap(plain, np.uint8, mode="r"), str(plain)
        elif archive.is_file():
            try:
                with zipfile.ZipFile(archive) as zipped:
                    raw = np.frombuffer(zipped.read("text8"), np.uint8)
            except zipfile.BadZipFile:
                raise ddiff.DataError(f"text8: {archive} is not a zip archive") from None
            except KeyError:
                raise ddiff.DataError(
                    f"text8: {archive} has no member named 'text8'; it is not the text8 zip"
                ) from None
            where = str(archive)
        else:
            raise ddiff.DataError(
                f"text8: {archive} is missing; download {TEXT8_URL} and put it there "
                f"(or set data.root to the directory that holds it)"
            )
        codes = _character_table(TEXT8_ALPHABET)[raw]
        if np.any(codes == 255):
            bad = int(np.argmax(codes == 255))
            raise ddiff.DataError(
                f"text8: {where} has byte {int(raw[bad])} ({chr(raw[bad])!r}) at offset {bad}; "
                f"text8 holds only lower-case letters a-z and spaces"
            )
        return codes, where

    def split(self, name: str) -> TokenWindows:
        codes, where = self._codes
        total = len(codes)
        bounds = {
            "train": (0, total * 9 // 10),
            "validation": (total * 9 // 10, total * 19 // 20),
            "test": (total * 19 // 20, total),
        }
        part = "train" if name == "train" else self.eval_split
        start, stop = bounds[part]
        windows = TokenWindows(
            codes[start:stop],
            length=self.length,
            stride=self.train_stride if name == "train" else self.length,
            vocab_size=self.vocab_size,
            where=where,
            offset=start,
        )
        return nonempty(
            windows,
            f"text8 ({where})",
            f"its {part} part has {stop - start} characters, fewer than length={self.length}",
        )
