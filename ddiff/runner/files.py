"""Files written whole or not at all: a reader never sees half a file, and a crash mid-write
leaves the previous version in place."""

import io
import os
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, and rename it
    over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` file of ``array``, in memory."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def numbered(path: Path, number: int) -> Path:
    """``name.ext`` with ``-number`` before its extension (``eval.json`` -> ``eval-2.json``);
    number 1 is ``path`` itself."""
    path = Path(path)
    return path if number == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")


def unused_path(path: Path, suffixes: tuple[str, ...] = ("",)) -> Path:
    """The first of ``path``, ``path-2``, ``path-3``, ... (the number before the
    extension) for which no file ``path + suffix`` exists for any of ``suffixes``: a
    result is never written over an earlier one. ``suffixes`` serves results written as
    several files (``.txt``, ``.npy``, ``.json`` of one stem)."""
    number = 1
    while any(Path(f"{numbered(path, number)}{suffix}").exists() for suffix in suffixes):
        number += 1
    return numbered(path, number)
