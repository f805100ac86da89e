"""Small data files in the real on-disk formats of the data sets ddiff reads.

Each writer makes deterministic content, so tests can check exactly what a source
returns (for images: the row-major (height, width, channel) flattening of the planar
files).
"""

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np

TEXT8_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def cifar_batch(count: int, seed: int) -> dict[bytes, object]:
    """One CIFAR-10 batch as the python pickles hold it (bytes keys, planar uint8 rows)."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fixture batch",
        b"labels": [int(v) for v in rng.integers(0, 10, count)],
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [f"image_{i}.png".encode() for i in range(count)],
    }


def write_cifar10(root: Path, *, per_batch: int = 6, test: int = 8, extracted: bool = False) -> Path:
    """``root/cifar-10-python.tar.gz`` (or the extracted ``cifar-10-batches-py/``) with
    data_batch_1..5, test_batch and batches.meta, pickled with protocol 2 as in the real
    archive. Returns the batches' path."""
    root.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(per_batch, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(test, 99)
    batches["batches.meta"] = {b"label_names": [b"airplane"] * 10, b"num_vis": 3072}
    if extracted:
        directory = root / "cifar-10-batches-py"
        directory.mkdir(exist_ok=True)
        for name, batch in batches.items():
            (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
        return directory
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, batch in batches.items():
            payload = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def text8_text(characters: int, seed: int = 0) -> bytes:
    """Lower-case words separated by single spaces, exactly ``characters`` long."""
    rng = np.random.default_rng(seed)
    words = ["the", "of", "and", "anarchism", "originated", "as", "a", "term", "abuse", "zebra"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), characters))
    return text[:characters].encode()


def write_text8(root: Path, characters: int = 20_000) -> Path:
    """``root/text8.zip`` holding one member ``text8`` (no newline, as the real file)."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "text8.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("text8", text8_text(characters))
    return archive


def imagenet_arrays(count: int, seed: int, side: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "data": rng.integers(0, 256, (count, side * side * 3), dtype=np.uint8),
        "labels": [int(v) for v in rng.integers(1, 1001, count)],
    }


def write_imagenet64(root: Path, *, files: int = 2, per_file: int = 4, val: int = 4) -> Path:
    """``train_data_batch_1..files.npz`` (with a ``mean`` array, as the real ones) and
    ``val_data.npz``: ``data`` (N, 12288) uint8 planar, ``labels`` 1..1000, stored
    uncompressed as the downloads are."""
    root.mkdir(parents=True, exist_ok=True)
    for number in range(1, files + 1):
        arrays = imagenet_arrays(per_file, number)
        mean = arrays["data"].mean(axis=0)
        np.savez(root / f"train_data_batch_{number}.npz", mean=mean, **arrays)
    np.savez(root / "val_data.npz", **imagenet_arrays(val, 1000))
    return root


def write_tokens(path: Path, count: int, vocab: int, dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    """A raw binary token file of ``count`` ids below ``vocab``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(seed).integers(0, vocab, count).astype(dtype)
    tokens.tofile(path)
    return tokens
