"""Downsampled ImageNet 64x64 from its standard npz files."""

import re
import zipfile
from pathlib import Path
from typing import ClassVar

import equinox as eqx
import numpy as np

import ddiff
from ddiff_plugins.datasets.images import AbstractImageSource
from ddiff_plugins.datasets.splits import ImageRows, nonempty


def _npz_array(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of an .npz file, memory-mapped when stored uncompressed (as the
    downsampled ImageNet files are), read into memory otherwise."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ddiff.DataError(f"imagenet64: {path} is not an .npz file ({error})") from None
    with archive:
        try:
            info = archive.getinfo(f"{name}.npy")
        except KeyError:
            raise ddiff.DataError(
                f"imagenet64: {path} has no array {name!r} (it has: "
                f"{', '.join(n.removesuffix('.npy') for n in archive.namelist())})"
            ) from None
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little")
        start += int.from_bytes(header[28:30], "little")
        handle.seek(start)
        try:
            version = np.lib.format.read_magic(handle)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[version]
            shape, fortran, dtype = read_header(handle)
        except (ValueError, KeyError) as error:
            raise ddiff.DataError(
                f"imagenet64: {path}: array {name!r} is unreadable ({error})"
            ) from None
        offset = handle.tell()
    if dtype.hasobject:
        raise ddiff.DataError(f"imagenet64: {path}: array {name!r} holds Python objects")
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _imagenet_file(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    data = _npz_array(path, "data")
    labels = np.asarray(_npz_array(path, "labels"))
    dims = side * side * 3
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != dims:
        raise ddiff.DataError(
            f"imagenet64: {path} has images of shape {data.shape} and dtype {data.dtype}; "
            f"expected (N, {dims}) uint8, {side}x{side} RGB images"
        )
    if (
        labels.shape != (data.shape[0],)
        or labels.min(initial=1) < 1
        or labels.max(initial=1) > 1000
    ):
        raise ddiff.DataError(
            f"imagenet64: {path} should have {data.shape[0]} labels in 1..1000, has "
            f"{labels.shape[0] if labels.ndim == 1 else labels.shape} in "
            f"{labels.min(initial=1)}..{labels.max(initial=1)}"
        )
    return data, labels.astype(np.int32) - 1


class ImageNet64Source(AbstractImageSource):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017) from its standard npz files:
    ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and ``val_data.npz``, each
    with ``data`` (N, 12288) uint8 in channel-planar order and ``labels`` 1..1000. The
    validation set is the eval split. Images are D = 64x64x3 = 12288 tokens of 256 values
    in (height, width, channel) order. The files are memory-mapped when a split is first
    asked for, and the maps kept outside the module (:func:`ddiff.cached_load`).

    Attributes (recipe keys):
        root: directory of the npz files.
        class_conditional: give the class label (0..999) with each image.
    """

    root: str = eqx.field(static=True, default="data/imagenet64")
    class_conditional: bool = eqx.field(static=True, default=False)
    side: ClassVar[int] = 64
    num_labels: ClassVar[int] = 1000

    def _files(self, name: str) -> list[Path]:
        root = Path(self.root).expanduser().absolute()
        where = (
            f"put the downsampled ImageNet 64x64 npz files (train_data_batch_1.npz .. "
            f"train_data_batch_10.npz, val_data.npz) in {root}, or set data.root"
        )
        if name == "eval":
            path = root / "val_data.npz"
            if not path.is_file():
                raise ddiff.DataError(f"imagenet64: {path} is missing; {where}")
            return [path]
        numbers = sorted(
            int(match.group(1))
            for p in root.glob("train_data_batch_*.npz")
            if (match := re.fullmatch(r"train_data_batch_(\d+)\.npz", p.name))
        )
        if not numbers:
            raise ddiff.DataError(f"imagenet64: {root}/train_data_batch_1.npz is missing; {where}")
        gaps = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        if gaps:
            raise ddiff.DataError(
                f"imagenet64: {root}/train_data_batch_{gaps[0]}.npz is missing; {where}"
            )
        return [root / f"train_data_batch_{n}.npz" for n in numbers]

    @ddiff.cached_load
    def _opened(self) -> dict[str, ImageRows]:
        """The splits opened so far, by name."""
        return {}

    def split(self, name: str) -> ImageRows:
        if name not in self._opened:
            rows = self.image_rows([_imagenet_file(path, self.side) for path in self._files(name)])
            self._opened[name] = nonempty(rows, "imagenet64", f"its {name} files hold no images")
        return self._opened[name]
