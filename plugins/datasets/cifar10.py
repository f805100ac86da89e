"""CIFAR-10 from the standard python-pickle tarball."""

import io
import tarfile
import zlib
from pathlib import Path
from typing import ClassVar

import equinox as eqx
import numpy as np

import ddiff
from ddiff_plugins.datasets.download import download
from ddiff_plugins.datasets.images import AbstractImageSource
from ddiff_plugins.datasets.splits import ImageRows, nonempty
from ddiff_plugins.datasets.unpickling import ArrayUnpickler

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3072) uint8 planar, labels (N,)) of one CIFAR-10 python batch."""
    try:
        batch = ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ddiff.DataError(f"{where}: not a CIFAR-10 python pickle ({error})") from None
    if not isinstance(batch, dict):
        raise ddiff.DataError(f"{where}: not a CIFAR-10 batch (a pickled {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ddiff.DataError(f"{where}: not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", None)
        raise ddiff.DataError(
            f"{where}: images have shape {shape} and dtype {getattr(data, 'dtype', None)}; "
            f"expected (N, 3072) uint8, 32x32 RGB images"
        )
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ddiff.DataError(f"{where}: expected {data.shape[0]} labels in 0..9")
    return data, labels.astype(np.int32)


class CIFAR10Source(AbstractImageSource):
    """CIFAR-10 from the standard python-pickle tarball: 50,000 training and 10,000 test
    images (the test set is the eval split), each D = 32x32x3 = 3072 tokens of 256 values,
    flattened in (height, width, channel) order.

    The tarball ``cifar-10-python.tar.gz`` (or its extracted ``cifar-10-batches-py``
    directory) is read from ``root``; when absent it is downloaded there with a progress
    bar and an MD5 check. The batches are read into memory (about 180 MB) when a split is
    first asked for, and kept outside the module (:func:`ddiff.cached_load`).

    Attributes (recipe keys):
        root: directory holding (or receiving) the tarball.
        download: whether to download the tarball when it is absent.
        class_conditional: give the class label (0..9) with each image.
    """

    root: str = eqx.field(static=True, default="data/cifar10")
    download: bool = eqx.field(static=True, default=True)
    class_conditional: bool = eqx.field(static=True, default=False)
    side: ClassVar[int] = 32
    num_labels: ClassVar[int] = 10

    def _members(self) -> dict[str, tuple[bytes, str]]:
        root = Path(self.root).expanduser().absolute()
        names = (*CIFAR10_TRAIN, CIFAR10_TEST)
        extracted = root / CIFAR10_DIR
        if extracted.is_dir():
            missing = [n for n in names if not (extracted / n).is_file()]
            if missing:
                raise ddiff.DataError(
                    f"cifar10: {extracted} lacks {', '.join(missing)}; put the complete "
                    f"extracted {CIFAR10_DIR} directory there, or the tarball {CIFAR10_ARCHIVE} in {root}"
                )
            return {n: ((extracted / n).read_bytes(), str(extracted / n)) for n in names}
        archive = root / CIFAR10_ARCHIVE
        if not archive.exists():
            if not self.download:
                raise ddiff.DataError(
                    f"cifar10: {archive} is missing; download {CIFAR10_URL} and put it there "
                    f"(or set data.download=true, or data.root to the directory that holds it)"
                )
            download(CIFAR10_URL, archive, CIFAR10_MD5, "cifar10")
        try:
            with tarfile.open(archive, "r:gz") as tar:
                found = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in found]
                if missing:
                    raise ddiff.DataError(
                        f"cifar10: {archive} lacks {', '.join(missing)}; it is not the CIFAR-10 "
                        f"python tarball ({CIFAR10_URL})"
                    )
                return {
                    n: (tar.extractfile(found[n]).read(), f"{archive}:{found[n].name}")
                    for n in names
                }
        except zlib.error as error:
            raise ddiff.DataError(
                f"cifar10: {archive} is corrupt (zlib: {error}), a damaged download; delete it and "
                f"download it again from {CIFAR10_URL} (with data.download=true ddiff does)"
            ) from None
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ddiff.DataError(
                f"cifar10: {archive} is not a gzip-compressed tar archive ({error}); "
                f"replace it with the CIFAR-10 python tarball from {CIFAR10_URL}"
            ) from None

    @ddiff.cached_load
    def _splits(self) -> dict[str, ImageRows]:
        batches = {name: _cifar_batch(raw, where) for name, (raw, where) in self._members().items()}
        return {
            split: self.image_rows([batches[n] for n in names])
            for split, names in (("train", CIFAR10_TRAIN), ("eval", (CIFAR10_TEST,)))
        }

    def split(self, name: str) -> ImageRows:
        return nonempty(self._splits[name], "cifar10", f"its {name} batches hold no images")
