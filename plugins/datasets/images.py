"""What the RGB image sources share: D = side x side x 3 tokens of 256 values."""

from collections.abc import Sequence

import equinox as eqx
import numpy as np

import ddiff
from ddiff_plugins.datasets.splits import ImageRows


class AbstractImageSource(ddiff.AbstractDataSource):
    """Square RGB images of ``side`` pixels as D = side x side x 3 tokens of 256 values in
    (height, width, channel) order, scored in bits per dimension. Every final subclass has
    a ``class_conditional`` recipe key: with it, each image comes with its label, one of
    ``num_labels``."""

    side: eqx.AbstractClassVar[int]
    num_labels: eqx.AbstractClassVar[int]
    class_conditional: eqx.AbstractVar[bool]

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def seq_len(self) -> int:
        return self.side * self.side * 3

    @property
    def num_classes(self) -> int:
        return self.num_labels if self.class_conditional else 0

    @property
    def metric(self) -> str:
        return "bits_per_dim"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.side, self.side, 3)

    def image_rows(self, files: Sequence[tuple[np.ndarray, np.ndarray]]) -> ImageRows:
        """The split of the ``(images, labels)`` of each file, in order, labelled when
        ``class_conditional``."""
        labels = np.concatenate([labels for _, labels in files])
        return ImageRows(
            [images for images, _ in files],
            labels if self.class_conditional else None,
            self.image_shape,
        )
