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
