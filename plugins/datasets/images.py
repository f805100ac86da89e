"""What the RGB image sources share: D = side x side x 3 tokens of 256 values."""

from typing import ClassVar

import ddiff


class AbstractImageSource(ddiff.AbstractDataSource):
    """Square RGB images of ``side`` pixels as D = side x side x 3 tokens of 256 values in
    (height, width, channel) order, scored in bits per dimension. Final subclasses are
    frozen dataclasses with a ``class_conditional`` field: with it, each image comes with
    its label, one of ``num_labels``."""

    side: ClassVar[int]
    num_labels: ClassVar[int]
    class_conditional: bool

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
